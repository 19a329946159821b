"""What this process was when uncond was first imported, read before the package's imports (torch, diffusers:
seconds), which are what could change it."""

import os

# Its parent then: under a launcher, the launcher. One that ended during the imports would have handed the
# process to another parent by the time the processes meet (environment.launcher_pid).
PARENT = os.getppid()
