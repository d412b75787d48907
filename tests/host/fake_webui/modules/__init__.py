"""A minimal fake of the web UI's `modules` package (A1111 1.10 names), recording what adapters call."""
