"""The varlink API: the only layer that speaks the wire format.

``handlers`` (method handlers: parameters -> core -> reply; authorization by peer
credentials; one error mapping), ``views`` (dataclasses of the core rendered as the
IDL's lowerCamelCase records), ``faults`` (GetFaults' records), ``auditlog``
(short, rate-limited audit lines).
"""
