"""How a worker runs tasks: its thread pool (:mod:`~mqtasks.execution.pool`), the
event loop of ``async def`` tasks (:mod:`~mqtasks.execution.loop`), time limits
and stopping a running task (:mod:`~mqtasks.execution.running`,
:mod:`~mqtasks.execution.timelimit`), and the settlements the deciding
middleware chooses (:mod:`~mqtasks.execution.decisions`).
"""
