"""Executors: the ranks of an EP group in this process, or as Ray worker actors."""
