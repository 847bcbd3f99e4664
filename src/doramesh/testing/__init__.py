"""Start local fleets for the demo, the tests and SDK users."""
