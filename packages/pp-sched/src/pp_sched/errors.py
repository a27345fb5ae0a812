"""The one exception type of ``pp_sched``."""


class PipelineScheduleError(ValueError):
    """A schedule, a schedule request or a layer split that cannot work; the message names the rule."""
