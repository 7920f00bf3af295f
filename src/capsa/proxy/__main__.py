import sys

from capsa.proxy.main import main

sys.exit(main())
