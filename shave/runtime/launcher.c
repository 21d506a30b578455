/* shave's parallel launcher: runs the compiled kernels' parallel loops with chunks claimed at run time.
 *
 * TVM's LLVM code calls a parallel loop's body through the module's `__TVMBackendParallelLaunch`
 * pointer as flambda(task_id, env, cdata); the body runs the task_id-th of env->num_task equal
 * static chunks of the loop. TVM's own pool runs task i on thread i and the caller waits for
 * all of them: a worker that the OS has not yet scheduled stalls the kernel for a time slice.
 * Here a launch makes the same tasks (one per thread: smaller ones left a thread idle on the
 * last uneven chunk, 5-10 % slower on a quiet machine) but every thread, the caller included,
 * claims the next task not yet started until none is left: the caller runs whatever no worker
 * has picked up, and waits only on tasks under way.
 *
 * One pool per calling thread (as TVM's), made at its first parallel launch and grown to the
 * thread count that thread asks for (shave_set_threads). Workers spin for SPIN_NS after a
 * launch (kernels of one call follow each other within microseconds), then sleep on a futex;
 * a caller waiting on tasks under way spins WAIT_SPIN_NS, then sleeps until the last one ends.
 * Workers keep off the CPU their caller runs on (keep_off): a worker woken there waits for the
 * caller's time slice to end. On the 2-vCPU Zen 5 VM the kernel woke the sleeping worker there
 * after pauses (the other vCPU had halted), and LeNet-5 at batch 8 ran the first 2-3 ms after
 * each 0.5 s pause at its one-thread speed (68-72 against 44 us a call).
 * Workers run with a scheduler slice of CALL_SLICE_NS, and Runtime gives its caller the same for
 * the length of a call (shave_set_slice): Linux's EEVDF scheduler (6.6 and later; a task's own
 * slice, sched_attr.sched_runtime, since 6.12) cuts a task off after its slice (1.4 ms on the
 * 2-vCPU VM) and lets a sleeping task bank about two slices of lag, so a CPU-bound neighbour
 * could run once or more inside each 2-8 ms call. A longer slice changes how often a task is cut
 * off, not its share of the CPU (docs/tvm-notes.md, "A call's scheduler slice").
 * A launch from inside a chunk, or with one thread, runs serially in the caller.
 * Linux only (futex); shave installs it where this file builds and loads (runtime/launcher.py). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* sched_getaffinity, pthread_setname_np */
#endif
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct { void* sync_handle; int32_t num_task; } ShaveEnv; /* TVMParallelGroupEnv */
typedef int (*ShaveLambda)(int task_id, ShaveEnv* penv, void* cdata); /* FTVMParallelLambda */

enum { TASKS_PER_THREAD = 1, MAX_WORKERS = 255 };
static const int64_t SPIN_NS = 200000;
static const int64_t WAIT_SPIN_NS = 50000; /* the caller, waiting on tasks under way, then sleeps */
static const uint64_t CALL_SLICE_NS = 100000000; /* the longest the kernel allows */

typedef struct Pool {
  /* the job: written by the caller before it publishes `state`, read by workers after */
  ShaveLambda f;
  void* cdata;
  int32_t ntask;
  int32_t helpers;    /* workers 0 .. helpers-1 take part in this job */
  uint64_t state;     /* generation << 32 | the tasks claimed (run_chunks) */
  int32_t remaining;  /* chunks not yet finished (a futex word when the caller sleeps on it) */
  int32_t waiting;    /* the caller sleeps (or is about to) on `remaining` */
  int32_t error;      /* the first nonzero return of a chunk */
  uint32_t wake;      /* futex word: bumped to wake sleeping workers */
  int32_t sleepers;   /* workers asleep (or about to be) on `wake` */
  int32_t quit;
  int nworkers;
  int kept_off;       /* the CPU the workers were last kept off (-2: not yet set) */
  cpu_set_t allowed;  /* the workers' CPUs as made (their creator's) */
  pthread_t tid[MAX_WORKERS];
} Pool;

typedef struct { Pool* pool; int index; uint32_t seen; } Worker; /* seen: the generation before its first job */

static __thread Pool* tl_pool;
static __thread int tl_threads;    /* this thread's thread count; 0: every CPU it may use */
static __thread int tl_in_launch;  /* inside a launch (a chunk that launches runs it serially) */
static pthread_key_t pool_key;
static pthread_once_t key_once = PTHREAD_ONCE_INIT;

static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

typedef struct { /* struct sched_attr as first published (SCHED_ATTR_SIZE_VER0) */
  uint32_t size, policy;
  uint64_t flags;
  int32_t nice;
  uint32_t priority;
  uint64_t runtime, deadline, period;
} SchedAttr;

/* Set the calling thread's scheduler slice to `ns` (0: the kernel's default), keeping its policy
   and nice value; -> the slice it had, or -1 where none is set (a policy other than SCHED_OTHER or
   SCHED_BATCH, a kernel or sandbox without sched_setattr). Kernels older than 6.12 keep their own
   slice for these policies whatever sched_runtime says. */
long long shave_set_slice(long long ns) {
#if defined(SYS_sched_getattr) && defined(SYS_sched_setattr)
  SchedAttr a = {0};
  if (ns < 0 || syscall(SYS_sched_getattr, 0, &a, sizeof(a), 0) != 0) return -1;
  if (a.policy != SCHED_OTHER && a.policy != SCHED_BATCH) return -1;
  long long had = (long long)a.runtime;
  if (had == ns) return had;
  a.size = sizeof(a);
  a.flags &= 0x01; /* SCHED_FLAG_RESET_ON_FORK: the only flag of these policies */
  a.runtime = (uint64_t)ns;
  a.deadline = a.period = 0;
  return syscall(SYS_sched_setattr, 0, &a, 0) == 0 ? had : -1;
#else
  (void)ns;
  return -1;
#endif
}

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

/* Claim and run tasks of generation `gen` until none is left: first the thread's own task
   (`prefer`: thread k's, as in TVM's pool, so a thread keeps working on the rows it wrote in the
   kernel before), then any not started. With at most 32 tasks the low half of `state` marks the
   tasks claimed; with more it counts them (claimed in order). */
static void run_chunks(Pool* p, uint32_t gen, int prefer) {
  for (;;) {
    uint64_t v = __atomic_load_n(&p->state, __ATOMIC_ACQUIRE);
    if ((uint32_t)(v >> 32) != gen) return;
    ShaveLambda f = p->f;
    void* cdata = p->cdata;
    int32_t ntask = p->ntask;
    uint32_t low = (uint32_t)v, i;
    uint64_t next;
    if (ntask <= 32) {
      uint32_t all = ntask == 32 ? 0xffffffffu : (1u << ntask) - 1;
      uint32_t open = all & ~low;
      if (open == 0) return;
      i = (prefer < ntask && ((open >> prefer) & 1)) ? (uint32_t)prefer : (uint32_t)__builtin_ctz(open);
      next = v | (1ull << i);
    } else {
      if ((int32_t)low >= ntask) return;
      i = low;
      next = v + 1;
    }
    /* the job's fields are those of `gen` if this succeeds: the next job is written only after
       every task of this one, the one claimed here included, has finished */
    if (!__atomic_compare_exchange_n(&p->state, &v, next, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) continue;
    ShaveEnv env = {NULL, ntask};
    int rc = f((int)i, &env, cdata);
    if (rc != 0) {
      int32_t zero = 0;
      __atomic_compare_exchange_n(&p->error, &zero, rc, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
    }
    if (__atomic_sub_fetch(&p->remaining, 1, __ATOMIC_SEQ_CST) == 0 && __atomic_load_n(&p->waiting, __ATOMIC_SEQ_CST))
      syscall(SYS_futex, &p->remaining, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
  }
}

static void* worker_main(void* arg) {
  Worker* w = (Worker*)arg;
  Pool* p = w->pool;
  int index = w->index;
  uint32_t seen = w->seen; /* made by a launch before it publishes its job: the worker takes part in it */
  free(w);
  char name[16];
  snprintf(name, sizeof(name), "shave-w%d", index); /* as top, perf and gdb show it */
  pthread_setname_np(pthread_self(), name);
  tl_in_launch = 1; /* a chunk that launches runs that launch serially */
  shave_set_slice((long long)CALL_SLICE_NS); /* it runs only inside calls */
  for (;;) {
    int64_t until = now_ns() + SPIN_NS;
    int spins = 0;
    uint32_t gen;
    for (;;) {
      if (__atomic_load_n(&p->quit, __ATOMIC_ACQUIRE)) return NULL;
      gen = (uint32_t)(__atomic_load_n(&p->state, __ATOMIC_ACQUIRE) >> 32);
      if (gen != seen) break;
      cpu_relax();
      if (++spins % 64) continue;
      if (now_ns() < until) continue;
      /* sleep until the caller bumps `wake`; recheck after announcing it (no lost wake-up) */
      uint32_t w0 = __atomic_load_n(&p->wake, __ATOMIC_SEQ_CST);
      __atomic_add_fetch(&p->sleepers, 1, __ATOMIC_SEQ_CST);
      gen = (uint32_t)(__atomic_load_n(&p->state, __ATOMIC_SEQ_CST) >> 32);
      if (gen == seen && !__atomic_load_n(&p->quit, __ATOMIC_SEQ_CST))
        syscall(SYS_futex, &p->wake, FUTEX_WAIT_PRIVATE, w0, NULL, NULL, 0);
      __atomic_sub_fetch(&p->sleepers, 1, __ATOMIC_SEQ_CST);
      until = now_ns() + SPIN_NS;
    }
    seen = gen;
    if (index < __atomic_load_n(&p->helpers, __ATOMIC_ACQUIRE)) run_chunks(p, gen, index + 1);
  }
}

static void wake_all(Pool* p) {
  if (__atomic_load_n(&p->sleepers, __ATOMIC_SEQ_CST) > 0) {
    __atomic_add_fetch(&p->wake, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, &p->wake, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
  }
}

static void pool_free(void* arg) { /* at the calling thread's exit */
  Pool* p = (Pool*)arg;
  __atomic_store_n(&p->quit, 1, __ATOMIC_SEQ_CST);
  __atomic_add_fetch(&p->wake, 1, __ATOMIC_SEQ_CST);
  syscall(SYS_futex, &p->wake, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
  for (int i = 0; i < p->nworkers; ++i) pthread_join(p->tid[i], NULL);
  free(p);
}

static void make_key(void) { pthread_key_create(&pool_key, pool_free); }

static int available_cpus(void) {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set) > 0 ? CPU_COUNT(&set) : 1;
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? (int)n : 1;
}

/* Let the workers run on the pool's CPUs but `cpu` (on all of them where that is the only one). */
static void keep_off(Pool* p, int cpu) {
  cpu_set_t other = p->allowed;
  if (cpu >= 0 && cpu < CPU_SETSIZE) CPU_CLR(cpu, &other);
  const cpu_set_t* mask = CPU_COUNT(&other) > 0 ? &other : &p->allowed;
  for (int i = 0; i < p->nworkers; ++i) pthread_setaffinity_np(p->tid[i], sizeof(cpu_set_t), mask);
  p->kept_off = cpu;
}

/* This thread's pool with at least `workers` workers (fewer if threads cannot start). */
static Pool* get_pool(int workers) {
  Pool* p = tl_pool;
  if (p == NULL) {
    pthread_once(&key_once, make_key);
    p = (Pool*)calloc(1, sizeof(Pool));
    if (p == NULL) return NULL;
    tl_pool = p;
    pthread_setspecific(pool_key, p);
    if (sched_getaffinity(0, sizeof(cpu_set_t), &p->allowed) != 0) {
      CPU_ZERO(&p->allowed);
      for (int i = 0; i < available_cpus() && i < CPU_SETSIZE; ++i) CPU_SET(i, &p->allowed);
    }
  }
  int had = p->nworkers;
  if (workers > MAX_WORKERS) workers = MAX_WORKERS;
  while (p->nworkers < workers) {
    Worker* w = (Worker*)malloc(sizeof(Worker));
    if (w == NULL) break;
    w->pool = p;
    w->index = p->nworkers;
    w->seen = (uint32_t)(p->state >> 32);
    if (pthread_create(&p->tid[p->nworkers], NULL, worker_main, w) != 0) {
      free(w);
      break;
    }
    p->nworkers++;
  }
  if (p->nworkers != had) p->kept_off = -2; /* new workers: set every worker's CPUs at the next launch */
  return p;
}

/* The threads this calling thread's launches use (n >= 1; 0: every CPU the process may use). */
int shave_set_threads(int n) {
  tl_threads = n > 0 ? n : 0;
  return 0;
}

/* The behaviour's version: a process that loads several launchers (artifacts of different shave
   versions) points the libraries it loads after at the highest (runtime/launcher.py). */
#ifndef SHAVE_LAUNCHER_VERSION
#define SHAVE_LAUNCHER_VERSION 3
#endif
int shave_launcher_version(void) { return SHAVE_LAUNCHER_VERSION; }

/* The slice Runtime gives its calling thread for the length of a call (shave_set_slice). */
long long shave_call_slice(void) { return (long long)CALL_SLICE_NS; }

/* The threads this calling thread's launches use. */
int shave_threads(void) { return tl_threads > 0 ? tl_threads : available_cpus(); }

int shave_parallel_launch(ShaveLambda f, void* cdata, int num_task) {
  int threads = shave_threads();
  Pool* p = (threads > 1 && !tl_in_launch) ? get_pool(threads - 1) : NULL;
  if (p == NULL || p->nworkers == 0) {
    ShaveEnv env = {NULL, 1};
    return f(0, &env, cdata);
  }
  int cpu = sched_getcpu();
  if (cpu != p->kept_off) keep_off(p, cpu); /* a syscall per worker, only when the caller has moved */
  int helpers = threads - 1 < p->nworkers ? threads - 1 : p->nworkers;
  int32_t ntask = num_task > 0 ? num_task : (helpers + 1) * TASKS_PER_THREAD;
  p->f = f;
  p->cdata = cdata;
  p->ntask = ntask;
  p->error = 0;
  __atomic_store_n(&p->helpers, helpers, __ATOMIC_RELAXED);
  __atomic_store_n(&p->remaining, ntask, __ATOMIC_RELAXED);
  uint32_t gen = (uint32_t)(p->state >> 32) + 1;
  __atomic_store_n(&p->state, (uint64_t)gen << 32, __ATOMIC_SEQ_CST); /* publish */
  wake_all(p);
  tl_in_launch = 1;
  run_chunks(p, gen, 0);
  tl_in_launch = 0;
  /* wait for tasks under way on workers: spin, then sleep (on a busy machine a spinning caller
     uses up its share of the CPU while the worker it waits for is not running) */
  int64_t until = 0;
  for (int spins = 1;; ++spins) {
    int32_t left = __atomic_load_n(&p->remaining, __ATOMIC_ACQUIRE);
    if (left == 0) break;
    cpu_relax();
    if (spins % 64) continue;
    if (until == 0) until = now_ns() + WAIT_SPIN_NS;
    if (now_ns() < until) continue;
    __atomic_store_n(&p->waiting, 1, __ATOMIC_SEQ_CST);
    left = __atomic_load_n(&p->remaining, __ATOMIC_SEQ_CST);
    if (left > 0) syscall(SYS_futex, &p->remaining, FUTEX_WAIT_PRIVATE, left, NULL, NULL, 0);
    __atomic_store_n(&p->waiting, 0, __ATOMIC_SEQ_CST);
  }
  return p->error;
}

#ifdef __cplusplus
}
#endif
