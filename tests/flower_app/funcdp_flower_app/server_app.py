"""The ServerApp: funcdp's DP-FedAvg server over SecAgg+."""

from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context) -> None:
    from funcdp_flower_app import task

    task.serve(grid, context)
