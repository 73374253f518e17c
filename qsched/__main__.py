from qsched.cli import main

raise SystemExit(main())
