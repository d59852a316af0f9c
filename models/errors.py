"""The base class of errors a user can cause and fix. The CLI prints their
message (which says what happened and what to do) instead of a traceback."""


class ShopTalkError(Exception):
    exit_code = 2
