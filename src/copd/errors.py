"""The one exception type for user mistakes; the CLI prints it as a single line."""


class CopdError(Exception):
    """A problem with the user's input (config, data, paths), reported without a traceback."""


class BranchLost(CopdError):
    """A branch's worker is gone (its process was killed, say); the run can go on from its last checkpoint."""

    def __init__(self, branch: str, where: str):
        self.branch, self.where = branch, where
        super().__init__(f"branch {branch!r} was lost during {where}")


class BranchNotStarted(CopdError):
    """A restarted branch's new worker did not come up (no resources left to place it, say: a lost node)."""

    def __init__(self, branch: str, why: str):
        self.branch, self.why = branch, why
        super().__init__(f"branch {branch!r}: its new actor {why}")
