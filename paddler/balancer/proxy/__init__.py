"""The reverse proxy that clients call: every request to a free slot, or in line for one."""
