"""The `fsdpqlora` command: from a command line to torchrun workers, on one node or under SLURM.

    cli.py           the command and its sub-commands; checks everything that can be checked in one
                     process before any worker starts
    agent.py         torchrun's elastic agent, in-process, with the restart policy training needs
    slurm.py         `fsdpqlora submit`: the job script (sbatch_body.sh under #SBATCH lines) and sweeps
"""
