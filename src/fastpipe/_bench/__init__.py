"""The benchmark harness: one implementation of every workload, shared by
``fastpipe bench`` and the pytest-benchmark files in ``bench/``.

Standard library only: it ships in the wheel, and fastpipe has no run-time
dependencies (``plot`` imports matplotlib only when a chart is drawn).
Nothing here is imported until ``fastpipe bench`` runs.

The modules, from the bytes up to the report:

    common          units, the longest wait, the error, one end of a copy
    pattern         the bytes every workload moves and their check; also the
                    program of the endpoint processes
    endpoints       the sender and sink processes, as the harness drives them
    methods         the methods' names, titles and how each copies
    baselines       the standard library's ways of copying, and the busy loop
    cases           the case framework: one workload by one method, round by round
    host            scratch space, and the same free pages for every method
    workloads       the bulk workloads (file, pipe, TCP) and TCP with a busy main thread
    small_relays    many short relays at once
    runner          the methods taking turns round by round; Result
    verdict         one line per workload: fastpipe against the best stdlib way
    report          the text tables and their footnotes
    memory          the RSS of relays parked on idle pipes
    twins           the other implementation, run in a child process
    suite           ``fastpipe bench`` itself: all of the above, the report, the JSON
    plot            ``--plot``: the JSON document as a bar chart
    proxy, proxy_peers          ``proxy()`` beside asyncio and threads
    forward, asyncio_forward    ``fastpipe forward`` beside an asyncio forwarder
"""
