"""The fused Triton attention kernels (attention: forward and backward, as torch.library custom ops), the attention
shapes of the SD models they are written for (shapes), and a compile check for a GPU that is not there
(compile_check: ptxas's registers, spills and shared memory for sm_90). They read and write tensors only: a reader
studies them without the rest of minidream.

May import: nothing of minidream (only torch and triton).
"""
