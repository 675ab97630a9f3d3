"""Builds signed bundles, the recovery OS and bootable appliance disk images from Debian packages."""
