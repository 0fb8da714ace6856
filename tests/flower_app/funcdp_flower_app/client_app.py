"""The ClientApp: Flower's SecAgg+ mod around a funcdp client.

funcdp (and torch) load inside `client_fn`: Flower starts a process per message, and only the
training stage needs them; SecAgg+'s key stages run on Flower alone.
"""

from flwr.client import ClientApp
from flwr.client.mod import secaggplus_mod


def client_fn(context):
    from funcdp_flower_app import task

    return task.make_client(context).to_client()


app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
