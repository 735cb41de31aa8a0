from imprint.runtime.cli import main

raise SystemExit(main())
