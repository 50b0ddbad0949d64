"""stub"""


def doctor() -> None:
    pass


def diagnose() -> None:
    pass
