"""What to do with a call that should not go upstream as it is: trim, retry, downgrade, answer."""
