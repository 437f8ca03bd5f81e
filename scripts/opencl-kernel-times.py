#!/usr/bin/env python3
"""opencl-kernel-times.py: a measuring aid for OpenCL kernel work. Patches a
COPY of a source tree (never the checkout: the patch makes the backend wait
for every kernel) so that its OpenCL backend and `polysample bench` time each
kernel with OpenCL's profiling events, and can show the driver's build log:

    git archive REV | tar x -C /tmp/tree && scripts/opencl-kernel-times.py /tmp/tree
    (build /tmp/tree with OpenCL on, then:)
    KTIMES_FILE=kt.txt polysample bench --backend opencl:0 ...   # per-kernel means
    KT_OPTIONS=-cl-nv-verbose KT_BUILDLOG=build.log ...          # NVIDIA: registers
    KT_BINARY=program.ptx ...        # the program binary (PTX on NVIDIA's driver)

KTIMES_FILE gets one line per kernel at exit: calls and mean ms (warm-up
included), and the first call's wall time from enqueue to completion (with a
first-use compile such as PoCL's, that compile). KT_OPTIONS is appended to the program's build options and
KT_BUILDLOG receives the build log, KT_BINARY the program's binary. It works on every tree since feedc36
(the edits assert that their anchors exist); bench/RESULTS.md's tenth-session
probes were taken with it."""
import sys, re, pathlib
if len(sys.argv) != 2 or not (pathlib.Path(sys.argv[1]) / "backends/opencl").is_dir():
    sys.exit("usage: opencl-kernel-times.py TREE  (a copy of the sources, patched in place)")
root = pathlib.Path(sys.argv[1])
b = root / "backends/opencl/opencl_backend.c"
s = b.read_text()
s2 = s.replace("clCreateCommandQueue(state->context, state->device, 0, &code)",
               "clCreateCommandQueue(state->context, state->device, CL_QUEUE_PROFILING_ENABLE, &code)")
assert s2 != s, "queue"
b.write_text(s2)
l = root / "backends/opencl/opencl_launch.c"
s = l.read_text()
helper = r'''
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <time.h>
static struct { const char *name; double ms; long n; double first_wall_ms; } ktimes[64];
static double ktimes_now(void)
{
    struct timespec t;
    timespec_get(&t, TIME_UTC);
    return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}
static int ktimes_count;
static void ktimes_dump(void)
{
    const char *path = getenv("KTIMES_FILE");
    FILE *f = path ? fopen(path, "a") : stderr;
    if (!f) return;
    for (int i = 0; i < ktimes_count; ++i)
        fprintf(f, "%-22s %6ld calls %10.4f ms each, first call %10.1f ms wall\n", ktimes[i].name,
                ktimes[i].n, ktimes[i].ms / ktimes[i].n, ktimes[i].first_wall_ms);
    if (path) fclose(f);
}
static void ktimes_add(const char *name, cl_event ev, double start_ms)
{
    cl_ulong a = 0, b = 0;
    clWaitForEvents(1, &ev);
    const double wall_ms = ktimes_now() - start_ms;
    clGetEventProfilingInfo(ev, CL_PROFILING_COMMAND_START, sizeof a, &a, NULL);
    clGetEventProfilingInfo(ev, CL_PROFILING_COMMAND_END, sizeof b, &b, NULL);
    clReleaseEvent(ev);
    int i;
    for (i = 0; i < ktimes_count; ++i)
        if (!strcmp(ktimes[i].name, name)) break;
    if (i == ktimes_count) {
        if (i == 64) return;
        if (i == 0) atexit(ktimes_dump);
        ktimes[i].name = name;
        ktimes[i].first_wall_ms = wall_ms;
        ++ktimes_count;
    }
    ktimes[i].ms += (double)(b - a) * 1e-6;
    ktimes[i].n++;
}
'''
anchors = [a for a in ("static psm_status enqueue(opencl_state *state, cl_kernel kernel",
                        "psm_status opencl_enqueue(opencl_state *state, cl_kernel kernel")
           if s.count(a) == 1]
assert len(anchors) == 1, "enqueue"
anchor = anchors[0]
s = s.replace(anchor, helper + anchor)
old = re.compile(r"cl_int code = clEnqueueNDRangeKernel\(state->queue, kernel, 2, NULL, global, local, 0, NULL,\s*NULL\);")
assert len(old.findall(s)) == 1, "call"
s = old.sub("cl_event kt_ev = NULL;\n    const double kt_start = ktimes_now();\n    cl_int code = clEnqueueNDRangeKernel(state->queue, kernel, 2, NULL, global, local, 0, NULL, &kt_ev);\n    if (code == CL_SUCCESS) ktimes_add(name, kt_ev, kt_start);", s)
l.write_text(s)
c = root / "cli/bench_opencl.c"
s = c.read_text()
s2 = re.sub(r"clCreateCommandQueue\(session->context, device, 0, &status\)",
            "clCreateCommandQueue(session->context, device, CL_QUEUE_PROFILING_ENABLE, &status)", s)
assert s2 != s, "bench queue"
c.write_text(s2)
print("patched", root)
p = root / "backends/opencl/opencl_programs.c"
s = p.read_text()
old = 'snprintf(options, sizeof options, "-cl-std=CL1.2 -DPSM_WG=%zu", group);'
assert s.count(old) == 1, "options"
s = s.replace(old, 'snprintf(options, sizeof options, "-cl-std=CL1.2 -DPSM_WG=%zu %s", group, getenv("KT_OPTIONS") ? getenv("KT_OPTIONS") : "");')
old = "code = clBuildProgram(program, 1, &device, options, NULL, NULL);"
assert s.count(old) == 1, "build"
s = s.replace(old, old + r'''
        if (getenv("KT_BUILDLOG")) {
            size_t n = 0;
            clGetProgramBuildInfo(program, device, CL_PROGRAM_BUILD_LOG, 0, NULL, &n);
            char *text = malloc(n + 1);
            if (text && clGetProgramBuildInfo(program, device, CL_PROGRAM_BUILD_LOG, n, text, NULL) == CL_SUCCESS) {
                FILE *f = fopen(getenv("KT_BUILDLOG"), "a");
                if (f) { fprintf(f, "options: %s\n%s\n", options, text); fclose(f); }
            }
            free(text);
        }
        if (getenv("KT_BINARY")) {
            size_t n = 0;
            unsigned char *bytes = NULL;
            if (clGetProgramInfo(program, CL_PROGRAM_BINARY_SIZES, sizeof n, &n, NULL) == CL_SUCCESS &&
                (bytes = malloc(n)) != NULL &&
                clGetProgramInfo(program, CL_PROGRAM_BINARIES, sizeof bytes, &bytes, NULL) == CL_SUCCESS) {
                FILE *f = fopen(getenv("KT_BINARY"), "wb");
                if (f) { fwrite(bytes, 1, n, f); fclose(f); }
            }
            free(bytes);
        }''')
if "#include <stdlib.h>" not in s:
    s = "#include <stdlib.h>\n#include <stdio.h>\n" + s
p.write_text(s)
print("patched programs", root)
