"""The vecadd PTX shared by tests/gpu and the GPU benchmark (sm_50, JITs everywhere)."""

VECADD_PTX = (
    ".version 7.0\n.target sm_50\n.address_size 64\n"
    ".visible .entry vecadd(.param .u64 pa, .param .u64 pb,\n"
    "	.param .u64 pc, .param .u32 pn)\n{\n"
    "	.reg .pred %p;\n	.reg .b32 %r<9>;\n	.reg .b64 %rd<11>;\n"
    "	ld.param.u64 %rd1, [pa];\n	ld.param.u64 %rd2, [pb];\n"
    "	ld.param.u64 %rd3, [pc];\n	ld.param.u32 %r1, [pn];\n"
    "	mov.u32 %r2, %ctaid.x;\n	mov.u32 %r3, %ntid.x;\n"
    "	mov.u32 %r4, %tid.x;\n	mad.lo.s32 %r5, %r2, %r3, %r4;\n"
    "	setp.ge.u32 %p, %r5, %r1;\n	@%p bra DONE;\n"
    "	cvta.to.global.u64 %rd4, %rd1;\n	cvta.to.global.u64 %rd5, %rd2;\n"
    "	cvta.to.global.u64 %rd6, %rd3;\n	mul.wide.u32 %rd7, %r5, 4;\n"
    "	add.s64 %rd8, %rd4, %rd7;\n	add.s64 %rd9, %rd5, %rd7;\n"
    "	add.s64 %rd10, %rd6, %rd7;\n"
    "	ld.global.u32 %r6, [%rd8];\n	ld.global.u32 %r7, [%rd9];\n"
    "	add.u32 %r8, %r6, %r7;\n	st.global.u32 [%rd10], %r8;\n"
    "DONE:\n	ret;\n}\n").encode()
