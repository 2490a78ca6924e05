"""The request path, one stage a module: identify → admit → forward → settle.

Per-request helpers live beside the stage that uses them (budget, schedule, degrade,
coalesce, retry, cache, template, rewrite).
"""
