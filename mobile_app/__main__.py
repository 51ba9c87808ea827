"""`python -m mobile_app`: start the chat app."""

import sys

from mobile_app.main import main

sys.exit(main())
