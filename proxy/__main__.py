from proxy.launch import main

raise SystemExit(main())
