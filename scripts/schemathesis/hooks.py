"""Schemathesis hooks for the marketplace's contract run (scripts/contract.sh).

The one case excluded, by name: `kill_create`. It asks the order service to fail while
storing the order, which it does with a documented 500 (`injected_fault`); the
`not_a_server_error` check rightly flags any 500. Only that answer to that request is
dropped: every check still runs on every other request and response.
"""
import schemathesis


@schemathesis.hook
def filter_failure(ctx, failure, case, response):
    """Drops one failure: the documented 500 of an order asked to fail (`kill_create`)."""
    body = case.body if isinstance(case.body, dict) else {}
    injected = (
        response.status_code == 500
        and body.get("kill_create") is True
        and '"injected_fault"' in response.text
    )
    return not injected
