"""The running system's side: the reflashctl command, downloads, feeds and staging an update."""
