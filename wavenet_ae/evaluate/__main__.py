"""`python -m wavenet_ae.evaluate`: the command line is `wavenet_ae.evaluate.main`."""
from wavenet_ae.evaluate import main

main()
