"""Test helpers (reference runs, a fake Hub server); kept out of the installed package."""
