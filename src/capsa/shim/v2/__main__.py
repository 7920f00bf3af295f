import sys

from capsa.shim.v2.main import main

sys.exit(main())
