"""``python -m prisma_lightning`` runs the ``prisma`` command line."""

from prisma_lightning.cli import main

if __name__ == "__main__":
    main()
