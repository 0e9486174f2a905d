"""systemd adapters: the D-Bus client and what nsd asks of systemd.

``bus`` (the connection, calls, signals, features), ``jobs`` (job and unit-exit
waits), ``properties`` and ``dbus_types`` (marshalling), ``units`` (unit, slice
and scope operations), ``slices`` (tenant slices, limits, placement of callers),
``unitfiles`` and ``unit_templates`` (Slice= drop-ins of opted-in templates),
``cgroup`` (what a unit's cgroup holds), ``notify`` (sd_notify and LISTEN_FDS),
``journal`` (structured journal records).
"""
