"""The operator's side: eviction, lease, pins, inventory, inspection, verify and the lmcache-fs CLI."""
