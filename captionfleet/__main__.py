from captionfleet.cli import main

raise SystemExit(main())
