"""A command's process: Ctrl-C and SIGTERM as a clean stop (runs end KILLED), and the console's progress."""
