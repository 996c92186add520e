from server.cli import main

# Guarded so that a child process started with "spawn" (vLLM's engine processes on the CPU) can import this module
# as its main module without starting a second server.
if __name__ == "__main__":
    main()
