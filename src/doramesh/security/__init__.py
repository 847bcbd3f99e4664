"""Fleet membership and authentication: the fleet CA, join and app tokens, enrolment,
credentials, and the per-RPC authorisation every server runs before its servicers.

See ``channels`` for how servers and channels use them.
"""
