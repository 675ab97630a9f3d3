"""What the recovery OS, the running system and the build host share: formats, checks and tools."""
