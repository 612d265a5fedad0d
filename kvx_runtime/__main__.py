from kvx_runtime.cli import main

main()
