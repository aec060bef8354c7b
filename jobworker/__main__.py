from jobworker.cli import main

raise SystemExit(main())
