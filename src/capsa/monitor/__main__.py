import sys

from capsa.monitor.main import main

sys.exit(main())
