"""benchmarks.sass: loops found in nvdisasm output and the per-element counts derived from them."""

from benchmarks.sass import ceilings, innermost_loops, parse_functions

SASS = """
\t.text.k:
k:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDG.E.128.CONSTANT R4, desc[UR4][R2.64] ;
        /*0020*/                   MUFU.EX2 R8, R4 ;
.L_x_0:
        /*0030*/                   FADD R9, R8, R9 ;
        /*0040*/               @P0 BRA `(.L_x_0) ;
        /*0050*/                   SHFL.BFLY PT, R10, R9, 0x1, 0x1f ;
        /*0060*/              @!P1 BRA `(.L_x_1) ;
.L_x_2:
	//## File "/repo/kernels/row.py", line 12
        /*0070*/                   LDG.E.U16 R4, desc[UR4][R2.64] ;
        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0090*/               @P2 BRA `(.L_x_2) ;
        /*00a0*/                   BRA `(.L_x_3) ;
.L_x_3:
        /*00b0*/                   EXIT ;
"""


def test_innermost_loading_loops_and_counts():
    functions = parse_functions(SASS)
    assert list(functions) == ["k"]
    instrs, labels = functions["k"]
    assert labels == {".L_x_1": 0x10, ".L_x_0": 0x30, ".L_x_2": 0x70, ".L_x_3": 0xB0}
    # the 0x30 loop loads nothing; the 0x10-0x60 loop contains it, so it is not innermost: the innermost
    # loop that loads is the 2-byte one at 0x70 (a forward BRA is no loop)
    (loop,) = innermost_loops("k", instrs, labels, min_instructions=0)
    assert (loop.start, loop.end, loop.instructions, loop.load_bytes, loop.bar, loop.mufu) == (0x70, 0x90, 3, 2, 1, 0)
    assert loop.where == "row.py:12"
    assert innermost_loops("k", instrs, labels, min_instructions=4) == []
    assert loop.per_element(2) == (3.0, 0.0)


def test_ceilings_scale_with_the_counts():
    issue, mufu = ceilings(10.0, 1.0, 2)
    issue2, mufu2 = ceilings(20.0, 2.0, 2)
    assert abs(issue / issue2 - 2) < 1e-12 and abs(mufu / mufu2 - 2) < 1e-12
    # 132 SMs x 1.98 GHz x 128 lanes / 10 instructions x 2 bytes
    assert abs(issue - 132 * 1.98e9 * 128 / 10 * 2 / 1e9) < 1e-6
    assert ceilings(10.0, 0.0, 2)[1] == float("inf")
