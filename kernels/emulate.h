// Runs this package's CUDA kernels on the CPU, for checking them where there is no GPU (kernels/emulate.py).
//
// The kernel source is compiled unchanged as C++ after this header. Every thread of a warp is a fiber
// (ucontext) on one OS thread; warps run one after another. A warp's lanes run until each reaches a warp
// intrinsic (__shfl_sync, __shfl_xor_sync, __ballot_sync) or returns; the scheduler then checks that the
// lanes met at the same intrinsic of the same source line, that every lane the mask names is still running
// and takes part, and computes each lane's result, as the hardware would. A kernel that breaks these rules
// (a shuffle after some lanes returned, divergent shuffles, a mask naming absent lanes) fails the launch with
// a message instead of giving the undefined result a GPU would. Launch arguments arrive as CUDA's
// kernelParams (an array of pointers to each value) with their sizes, which must match the kernel's
// parameter types: a Python int passed where the kernel takes a long long is an error here, not garbage.
//
// Not modelled: shared memory and __syncthreads (no kernel of this package uses them), timing,
// memory-model races between warps. Scalars: fp16 is GCC's _Float16 and bf16 is rounded to nearest even,
// as PTX's cvt.rn does; __expf is expf.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <ucontext.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct dim3 { unsigned int x = 1, y = 1, z = 1; };
struct float4 { float x, y, z, w; };

namespace emu {

constexpr int WARP = 32;
constexpr size_t STACK_BYTES = 256 * 1024;

enum Op { NONE, SHFL, SHFL_XOR, BALLOT };

struct Lane {
    ucontext_t ctx;
    bool done = false, waiting = false;
    Op op = NONE;
    int line = 0;
    unsigned int mask = 0;
    uint32_t value = 0;  // the 32-bit value (or predicate) this lane brings
    int arg = 0;         // source lane or xor mask
    uint32_t result = 0;
    char* stack = nullptr;
};

struct State {
    Lane lanes[WARP];
    ucontext_t scheduler;
    int current = 0;
    bool failed = false;
    std::string error;
    void (*thunk)(void*) = nullptr;
    void* thunk_arg = nullptr;
};

inline State& state() { static State s; return s; }

}  // namespace emu

// The built-in variables, set by the scheduler before it resumes a lane.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

inline void fail(const std::string& msg) {
    State& s = state();
    if (!s.failed) { s.failed = true; s.error = msg; }
}

// A lane arrives at a warp intrinsic: record what it brings and yield to the scheduler.
inline uint32_t warp_op(Op op, int line, unsigned int mask, uint32_t value, int arg) {
    State& s = state();
    Lane& l = s.lanes[s.current];
    l.op = op; l.line = line; l.mask = mask; l.value = value; l.arg = arg; l.waiting = true;
    swapcontext(&l.ctx, &s.scheduler);
    return l.result;
}

template <typename T> inline uint32_t bits_of(T v) {
    static_assert(sizeof(T) == 4, "warp shuffles of 32-bit values only");
    uint32_t b; std::memcpy(&b, &v, 4); return b;
}
template <typename T> inline T from_bits(uint32_t b) { T v; std::memcpy(&v, &b, 4); return v; }

inline void lane_main() {
    State& s = state();
    s.thunk(s.thunk_arg);
    s.lanes[s.current].done = true;  // returning resumes the scheduler (uc_link)
}

// Every live lane is waiting at an intrinsic: check the meeting and hand out results.
inline bool resolve(int warp_threads) {
    State& s = state();
    int first = -1;
    for (int i = 0; i < warp_threads; ++i) if (s.lanes[i].waiting) { first = i; break; }
    if (first < 0) return true;
    const Lane& f = s.lanes[first];
    char buf[256];
    for (int i = 0; i < warp_threads; ++i) {
        const Lane& l = s.lanes[i];
        if (l.waiting && (l.line != f.line || l.op != f.op)) {
            std::snprintf(buf, sizeof buf, "divergent warp intrinsics: lane %d at line %d, lane %d at line %d", first,
                          f.line, i, l.line);
            fail(buf); return false;
        }
        if (l.waiting && l.mask != f.mask) {
            std::snprintf(buf, sizeof buf, "lanes %d and %d disagree on the mask at line %d", first, i, f.line);
            fail(buf); return false;
        }
    }
    for (int i = 0; i < WARP; ++i) {
        if (!(f.mask >> i & 1u)) continue;
        if (i >= warp_threads || !s.lanes[i].waiting) {
            std::snprintf(buf, sizeof buf, "warp intrinsic at line %d names lane %d in its mask 0x%08x, but that lane %s",
                          f.line, i, f.mask, i >= warp_threads ? "does not exist" : "has returned");
            fail(buf); return false;
        }
    }
    for (int i = 0; i < warp_threads; ++i) {
        if (s.lanes[i].waiting && !(f.mask >> i & 1u)) {
            std::snprintf(buf, sizeof buf, "lane %d calls the intrinsic at line %d but is not in its mask", i, f.line);
            fail(buf); return false;
        }
    }
    uint32_t ballot = 0;
    if (f.op == BALLOT)
        for (int i = 0; i < warp_threads; ++i) if (s.lanes[i].waiting && s.lanes[i].value) ballot |= 1u << i;
    for (int i = 0; i < warp_threads; ++i) {
        Lane& l = s.lanes[i];
        if (!l.waiting) continue;
        if (f.op == BALLOT) l.result = ballot;
        else {
            const int src = f.op == SHFL ? (l.arg & (WARP - 1)) : (i ^ l.arg);
            // A source outside the warp or not taking part gives the lane's own value, as on the GPU.
            l.result = (src < warp_threads && src < WARP && s.lanes[src].waiting) ? s.lanes[src].value : l.value;
        }
    }
    for (int i = 0; i < warp_threads; ++i) s.lanes[i].waiting = false;  // only once every result is taken
    return true;
}

// Run one block: its warps one after another, each warp's lanes as fibers.
inline bool run_block(dim3 grid, dim3 block, dim3 bid) {
    State& s = state();
    const int threads = (int)(block.x * block.y * block.z);
    for (int w0 = 0; w0 < threads; w0 += WARP) {
        const int n = threads - w0 < WARP ? threads - w0 : WARP;
        for (int i = 0; i < n; ++i) {
            Lane& l = s.lanes[i];
            if (!l.stack) l.stack = static_cast<char*>(std::malloc(STACK_BYTES));
            l.done = l.waiting = false;
            getcontext(&l.ctx);
            l.ctx.uc_stack.ss_sp = l.stack;
            l.ctx.uc_stack.ss_size = STACK_BYTES;
            l.ctx.uc_link = &s.scheduler;
            makecontext(&l.ctx, lane_main, 0);
        }
        for (;;) {
            bool any_live = false;
            for (int i = 0; i < n; ++i) {
                Lane& l = s.lanes[i];
                if (l.done || l.waiting) continue;
                const int t = w0 + i;
                threadIdx = dim3{(unsigned)(t % block.x), (unsigned)(t / block.x % block.y), (unsigned)(t / (block.x * block.y))};
                blockIdx = bid; blockDim = block; gridDim = grid;
                s.current = i;
                swapcontext(&s.scheduler, &l.ctx);
                if (s.failed) return false;
            }
            for (int i = 0; i < n; ++i) any_live |= !s.lanes[i].done;
            if (!any_live) break;
            if (!resolve(n)) return false;
        }
    }
    return true;
}

template <typename... A, size_t... I>
void call_kernel(void (*k)(A...), void** params, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(params[I])...);
}

template <typename... A>
struct Launch { void (*kernel)(A...); void** params; };

template <typename... A>
void thunk(void* p) {
    auto* launch = static_cast<Launch<A...>*>(p);
    call_kernel(launch->kernel, launch->params, std::index_sequence_for<A...>{});
}

// cuLaunchKernel's contract: params[i] points at argument i; sizes[i] is its size in bytes as the caller passed it.
template <typename... A>
int launch(void (*k)(A...), dim3 grid, dim3 block, void** params, const int* sizes, int nparams, char* err, int errlen) {
    State& s = state();
    s.failed = false; s.error.clear();
    constexpr int expected = (int)sizeof...(A);
    const size_t widths[] = {sizeof(A)..., 0};
    if (nparams != expected) fail("the kernel takes " + std::to_string(expected) + " arguments; the launch passed " +
                                  std::to_string(nparams));
    for (int i = 0; i < expected && i < nparams && !s.failed; ++i)
        if ((size_t)sizes[i] != widths[i])
            fail("argument " + std::to_string(i) + " is " + std::to_string(sizes[i]) + " bytes; the kernel's parameter is " +
                 std::to_string(widths[i]));
    Launch<A...> launch_args{k, params};
    s.thunk = &thunk<A...>;
    s.thunk_arg = &launch_args;
    for (unsigned z = 0; z < grid.z && !s.failed; ++z)
        for (unsigned y = 0; y < grid.y && !s.failed; ++y)
            for (unsigned x = 0; x < grid.x && !s.failed; ++x)
                run_block(grid, block, dim3{x, y, z});
    if (s.failed) { std::snprintf(err, errlen, "%s", s.error.c_str()); return 1; }
    return 0;
}

}  // namespace emu

// CUDA's device functions used by the kernels, as the CPU computes them.
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline int __ffs(unsigned int x) { return __builtin_ffs((int)x); }
// Atomics: every thread of the grid runs on this one OS thread, and a fiber yields only at a warp intrinsic, so a
// plain read-modify-write is atomic here.
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long v) {
    unsigned long long old = *address; *address = old + v; return old;
}

template <typename T> inline T emu_shfl(int line, unsigned int mask, T v, int src) {
    return emu::from_bits<T>(emu::warp_op(emu::SHFL, line, mask, emu::bits_of(v), src));
}
template <typename T> inline T emu_shfl_xor(int line, unsigned int mask, T v, int lane_mask) {
    return emu::from_bits<T>(emu::warp_op(emu::SHFL_XOR, line, mask, emu::bits_of(v), lane_mask));
}
inline unsigned int emu_ballot(int line, unsigned int mask, int pred) {
    return emu::warp_op(emu::BALLOT, line, mask, pred ? 1u : 0u, 0);
}
#define __shfl_sync(mask, v, src) emu_shfl(__LINE__, (mask), (v), (src))
#define __shfl_xor_sync(mask, v, lane_mask) emu_shfl_xor(__LINE__, (mask), (v), (lane_mask))
#define __ballot_sync(mask, pred) emu_ballot(__LINE__, (mask), (pred))

// The scalar types of kernels/cuda.py's header, converted as PTX's cvt.rn does (round to nearest even).
#if SCALAR_KIND == 0
typedef float scalar_t;
inline float to_f(scalar_t v) { return v; }
inline scalar_t from_f(float v) { return v; }
#elif SCALAR_KIND == 1
typedef unsigned short scalar_t;
inline float to_f(scalar_t v) { _Float16 h; std::memcpy(&h, &v, 2); return (float)h; }
inline scalar_t from_f(float v) { _Float16 h = (_Float16)v; scalar_t b; std::memcpy(&b, &h, 2); return b; }
#else
typedef unsigned short scalar_t;
inline float to_f(scalar_t v) { return __uint_as_float(((unsigned int)v) << 16); }
inline scalar_t from_f(float v) {
    uint32_t b; std::memcpy(&b, &v, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (scalar_t)((b >> 16) | 0x40u);  // NaN stays NaN (quiet)
    return (scalar_t)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}
#endif
