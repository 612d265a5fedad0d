from kvx_runtime.entry import main

main()
