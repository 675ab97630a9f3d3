"""The recovery OS: PID 1, the installer and what it needs to find, erase and fill the system partition."""
