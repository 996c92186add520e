"""Text generation: the engine that serves causal language models with continuous (iteration-level) batching.

What a caller asks for and gets back (``GenerateRequest``, ``SamplingParams``, ``GenerationOutput``) lives in
``server.protocol.generation``, shared with the backends whose library runs its own loop; ``kv_blocks`` the paged allocation of the KV cache; ``sampling`` the per-request logits
processing; ``detokenizer`` incremental text with stop strings; ``engine`` the step loop that admits, runs, preempts
and retires sequences; ``scheduler`` the ``Scheduler`` that puts the engine behind the KServe infer path (Triton's
``text_input``/``text_output`` convention). The engine yields tokens; the front ends decide how they travel (SSE,
gRPC decoupled responses). Like the rest of ``server.scheduling`` this may import ``backends`` and below, never the
repository, the core or a front end. The sampling needs torch (the ``llm`` extra).
"""
