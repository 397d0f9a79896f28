from mailwatchd.cli import main

raise SystemExit(main())
