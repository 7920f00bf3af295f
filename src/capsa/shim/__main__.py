import sys

from capsa.shim.main import main

sys.exit(main())
