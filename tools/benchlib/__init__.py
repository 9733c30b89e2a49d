"""The parts of `tools/bench`: processes, programs, backends, proxies, loads, workloads
and the report. Nothing here is imported by dynproxy itself; nothing here may leave a
process running after `tools/bench` exits (every start goes through `procs.spawn`)."""
