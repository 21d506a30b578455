/* An AVX2 host on an AVX-512 one, for benchmarks (benchmarks/avx2_host.py): loaded with
   LD_PRELOAD, it makes the CPUID instruction report no AVX-512, AVX-VNNI or AMX, so that libraries
   which choose their kernels by CPUID (ONNX Runtime's MLAS, oneDNN, PyTorch's cpuinfo, LLVM's host
   detection) take their AVX2 paths. It uses Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, x86
   CPUs and VMs that offer `cpuid_fault`): CPUID then traps with SIGSEGV, and the handler runs the
   real instruction with faulting off for the moment, clears the feature bits and steps over it.
   The setting is per thread and inherited by threads and forked children (not across exec:
   children exec'd with this LD_PRELOAD set it again). Handlers others install for SIGSEGV (TVM's,
   Python's faulthandler) are kept and called for every fault that is not CPUID. The hardware still
   runs AVX-512 code: what changes is only what CPUID tells the libraries. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_SET_CPUID 0x1012

typedef int (*sigaction_fn)(int, const struct sigaction*, struct sigaction*);
static struct sigaction others; /* the SIGSEGV handler the process asked for last */
static volatile long traps;

static sigaction_fn real_sigaction(void) {
  static sigaction_fn f;
  if (!f) f = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
  return f;
}

static void mask(unsigned leaf, unsigned sub, unsigned* a, unsigned* b, unsigned* c, unsigned* d) {
  if (leaf == 7 && sub == 0) {
    /* EBX: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL */
    *b &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
    /* ECX: AVX512_VBMI, VBMI2, GFNI, VNNI, BITALG, VPOPCNTDQ */
    *c &= ~((1u << 1) | (1u << 6) | (1u << 8) | (1u << 11) | (1u << 12) | (1u << 14));
    /* EDX: AVX512_4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512_FP16, AMX-TILE, AMX-INT8 */
    *d &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25));
  } else if (leaf == 7 && sub == 1) {
    *a &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23)); /* AVX-VNNI, AVX512_BF16, AMX-FP16, AVX-IFMA */
  }
}

static void handler(int sig, siginfo_t* si, void* ctx) {
  ucontext_t* uc = (ucontext_t*)ctx;
  greg_t* g = uc->uc_mcontext.gregs;
  const unsigned char* ip = (const unsigned char*)g[REG_RIP];
  if (ip != NULL && ip[0] == 0x0f && ip[1] == 0xa2) {
    unsigned leaf = (unsigned)g[REG_RAX], sub = (unsigned)g[REG_RCX], a, b, c, d;
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, sub, a, b, c, d);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    mask(leaf, sub, &a, &b, &c, &d);
    g[REG_RAX] = a;
    g[REG_RBX] = b;
    g[REG_RCX] = c;
    g[REG_RDX] = d;
    g[REG_RIP] += 2;
    traps++;
    return;
  }
  if ((others.sa_flags & SA_SIGINFO) && others.sa_sigaction != NULL) {
    others.sa_sigaction(sig, si, ctx);
    return;
  }
  if (!(others.sa_flags & SA_SIGINFO) && others.sa_handler != SIG_DFL && others.sa_handler != SIG_IGN) {
    others.sa_handler(sig);
    return;
  }
  struct sigaction dfl;
  memset(&dfl, 0, sizeof(dfl));
  dfl.sa_handler = SIG_DFL;
  real_sigaction()(SIGSEGV, &dfl, NULL); /* the fault happens again and ends the process as it would have */
}

int sigaction(int sig, const struct sigaction* act, struct sigaction* old) {
  if (sig != SIGSEGV) return real_sigaction()(sig, act, old);
  if (old != NULL) *old = others;
  if (act != NULL) others = *act;
  return 0;
}

sighandler_t signal(int sig, sighandler_t h) {
  struct sigaction sa, old;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = h;
  sa.sa_flags = SA_RESTART;
  sigemptyset(&sa.sa_mask);
  if (sigaction(sig, &sa, &old) != 0) return SIG_ERR;
  return old.sa_handler;
}

long cpuid_mask_traps(void) { return traps; }

__attribute__((constructor)) static void init(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_sigaction = handler;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  others.sa_handler = SIG_DFL;
  if (real_sigaction()(SIGSEGV, &sa, NULL) != 0 || syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
    perror("cpuid_mask: CPUID faulting is not available here");
    _exit(3);
  }
}
