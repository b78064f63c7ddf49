/*
 * A fake libnvidia-ml.so.1 for testing gpuphase's NVML backend through the real pynvml ctypes layer.
 *
 * Struct layouts, function names and version constants follow nvidia-ml-py 13.x (pynvml.py), so a
 * layout mistake here shows up as garbage in the backend exactly as it would with the real driver.
 * tests/fakenvml/__init__.py builds it (gcc -shared -fPIC -O2 -pthread) and drives it.
 *
 * Behaviour is controlled by the file named in $FAKE_NVML_CONTROL: `key=value` lines, re-read
 * whenever the file changes (inode, size or mtime), so a test can change behaviour mid-run.
 *
 *   gpus=N                         number of GPUs (default 2, at most FAKE_MAX_GPUS)
 *   driver_missing=1               nvmlInit* returns NVML_ERROR_DRIVER_NOT_LOADED
 *   driver_unloaded=1              the kernel driver went away under a running agent: every call
 *                                  returns NVML_ERROR_UNINITIALIZED and nvmlInit* returns
 *                                  NVML_ERROR_DRIVER_NOT_LOADED. The NVML session is gone for good:
 *                                  after the key is removed ("driver reloaded") calls keep answering
 *                                  UNINITIALIZED until the caller runs nvmlInit again.
 *   hang.FUNCTION=SECONDS          FUNCTION sleeps before answering (any GPU, or no GPU)
 *   gpuN.hang.FUNCTION=SECONDS     same, for GPU N only. Removing the key ends a hang early.
 *   gpuN.gpm=0|1                   GPM supported (Hopper-like, default) or not (Ampere-like)
 *   gpuN.name=TEXT                 model name (default follows gpm)
 *   gpuN.lost=1                    every call on GPU N returns NVML_ERROR_GPU_IS_LOST
 *   gpuN.unsupported=A,B,...       functions (nvmlDeviceGetClockInfo), fields (field83) or GPM
 *                                  metrics (gpm10) that return NVML_ERROR_NOT_SUPPORTED
 *   gpuN.no_permission=A,B,...     functions that return NVML_ERROR_NO_PERMISSION
 *   gpuN.processes=PID:BYTES,...   compute processes and the device memory each holds
 *   gpuN.xid=79,79,13              XIDs delivered (once each, in order) through nvmlEventSetWait_v2;
 *                                  the list is cumulative: append to deliver more
 *   gpuN.xid_storm=XID:RATE        additionally deliver XID at RATE events per second
 *   gpuN.clock_reasons=MASK        fixed clocks-event-reasons bitmask (default follows load)
 *   gpuN.field.ID=VALUE            fixed value of scalar field ID (e.g. ECC or remapped-row counts)
 *   gpuN.mig=3g.40gb,3g.40gb       MIG mode on, with one GPU instance (one compute instance each) per
 *                                  profile, instance ids 1..k; an empty value is MIG on with no
 *                                  instances. Without the key MIG is off. A profile is `<n>g.<m>gb`:
 *                                  the instance has m GiB of memory. MIG devices have their own
 *                                  handles (name "<GPU name> MIG <profile>", UUID "MIG-..."); UUID,
 *                                  name, memory and the MIG queries answer on them, whole-GPU calls
 *                                  return NVML_ERROR_INVALID_ARGUMENT, and a handle of an instance
 *                                  that was removed since returns NVML_ERROR_INVALID_ARGUMENT too.
 *                                  nvmlGpmMigSampleGet samples an instance (NOT_FOUND for an unknown
 *                                  id); gpuN.unsupported=nvmlGpmMigSampleGet turns MIG GPM off.
 *   frozen_time=SECONDS            the simulated hardware's clock stands still at SECONDS since load,
 *                                  so every reading is reproducible (golden /metrics files)
 *
 * Test hooks (not NVML): fake_nvml_call_count(name) counts calls per function, and per requested
 * field as "field<ID>"; fake_nvml_sizeof(type) reports this file's struct sizes for layout checks.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* ---- NVML types and constants (from pynvml.py) ---------------------------------------------------- */

typedef unsigned int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0, NVML_ERROR_UNINITIALIZED = 1, NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3, NVML_ERROR_NO_PERMISSION = 4, NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7, NVML_ERROR_DRIVER_NOT_LOADED = 9, NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_GPU_IS_LOST = 15, NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25, NVML_ERROR_UNKNOWN = 999,
};
enum { VT_DOUBLE = 0, VT_UINT = 1, VT_ULONG = 2, VT_ULLONG = 3, VT_SLLONG = 4, VT_SINT = 5, VT_USHORT = 6 };

#define FAKE_MAX_GPUS 64
#define FIELD_MAX 308
#define GPM_METRIC_MAX 477
#define GPM_METRICS_GET_VERSION 1
#define GPM_SUPPORT_VERSION 1
#define MEMORY_V2_VERSION 0x02000028u
#define EVENT_XID 0x8ull
#define NO_INSTANCE 0xFFFFFFFFu
#define FAKE_MAX_MIG 7 /* an A100 or H100 splits into at most 7 GPU instances */
#define MIG_ENABLE 1

/* A device handle: the whole GPU `index` (instance 0) or its MIG device of GPU instance `instance`. */
struct fake_gpu { int index; unsigned int instance; };
typedef struct fake_gpu *nvmlDevice_t;

typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef union {
    double dVal; unsigned int uiVal; unsigned long ulVal; unsigned long long ullVal;
    long long sllVal; int siVal; unsigned short usVal;
} nvmlValue_t;
typedef struct {
    unsigned int fieldId, scopeId;
    long long timestamp, latencyUsec;
    unsigned int valueType;
    nvmlReturn_t nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_v2_t;
typedef struct {
    unsigned int pid;
    unsigned long long timeStamp;
    unsigned int smUtil, memUtil, encUtil, decUtil;
} nvmlProcessUtilizationSample_t;
typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType, eventData;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t;
typedef struct { const char *shortName, *longName, *unit; } nvmlGpmMetricInfo_t;
typedef struct {
    unsigned int metricId;
    nvmlReturn_t nvmlReturn;
    double value;
    nvmlGpmMetricInfo_t metricInfo;
} nvmlGpmMetric_t;
struct fake_gpm_sample { int gpu; unsigned int instance; int taken; double t; }; /* instance 0: whole GPU */
typedef struct fake_gpm_sample *nvmlGpmSample_t;
typedef struct {
    unsigned int version, numMetrics;
    nvmlGpmSample_t sample1, sample2;
    nvmlGpmMetric_t metrics[GPM_METRIC_MAX];
} nvmlGpmMetricsGet_t;
typedef struct { unsigned int version, isSupportedDevice; } nvmlGpmSupport_t;
struct fake_event_set { unsigned long long mask[FAKE_MAX_GPUS]; };
typedef struct fake_event_set *nvmlEventSet_t;

/* ---- state ------------------------------------------------------------------------------------------- */

#define MAX_PROCS 32
#define MAX_XIDS 1024
#define MAX_HANGS 32
#define LIST_LEN 1024

struct gpu_config {
    int gpm, lost, name_set;
    char name[96];
    char unsupported[LIST_LEN];   /* ",a,b," so that strstr(",name,") matches whole items */
    char no_permission[LIST_LEN];
    int nprocs;
    unsigned int proc_pid[MAX_PROCS];
    unsigned long long proc_bytes[MAX_PROCS];
    int nxids;
    unsigned int xids[MAX_XIDS];
    unsigned int storm_xid;
    double storm_rate;
    long long clock_reasons; /* -1: follow load */
    unsigned char field_set[FIELD_MAX];
    unsigned long long field_value[FIELD_MAX];
    int mig_enabled, nmig;
    char mig_profile[FAKE_MAX_MIG][24];
    unsigned long long mig_memory[FAKE_MAX_MIG]; /* bytes, from the profile */
};

struct hang { int gpu; char function[64]; double seconds; };

struct config {
    int gpus, driver_missing, driver_unloaded, nhangs;
    double frozen_time; /* < 0: time runs */
    struct hang hangs[MAX_HANGS];
    struct gpu_config gpu[FAKE_MAX_GPUS];
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct config cfg;
static struct fake_gpu handles[FAKE_MAX_GPUS];
static struct fake_gpu mig_handles[FAKE_MAX_GPUS][FAKE_MAX_MIG]; /* separate, so no MIG handle is a GPU handle */
static int init_count;
static double t0;
static struct { dev_t dev; ino_t ino; off_t size; struct timespec mtime; int present; } control_id;
/* runtime state that survives control-file reloads */
static int xids_delivered[FAKE_MAX_GPUS];
static unsigned long long storm_delivered[FAKE_MAX_GPUS];
static double storm_since[FAKE_MAX_GPUS];
static unsigned int storm_key[FAKE_MAX_GPUS];

#define MAX_COUNTERS 512
static struct { char name[64]; unsigned long long count; } counters[MAX_COUNTERS];
static int ncounters;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double elapsed(void) { return cfg.frozen_time >= 0 ? 1000.0 + cfg.frozen_time : now() - t0; }

__attribute__((constructor)) static void fake_nvml_load(void) {
    t0 = now() - 1000.0; /* counters start at a non-zero, already-running value */
    for (int i = 0; i < FAKE_MAX_GPUS; i++) {
        handles[i] = (struct fake_gpu){i, 0};
        for (int k = 0; k < FAKE_MAX_MIG; k++) mig_handles[i][k] = (struct fake_gpu){i, (unsigned int)k + 1};
    }
}

static void count_call_locked(const char *name) {
    for (int i = 0; i < ncounters; i++)
        if (strcmp(counters[i].name, name) == 0) { counters[i].count++; return; }
    if (ncounters < MAX_COUNTERS) {
        snprintf(counters[ncounters].name, sizeof counters[ncounters].name, "%s", name);
        counters[ncounters++].count = 1;
    }
}

unsigned long long fake_nvml_call_count(const char *name) {
    unsigned long long n = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < ncounters; i++)
        if (strcmp(counters[i].name, name) == 0) n = counters[i].count;
    pthread_mutex_unlock(&lock);
    return n;
}

long fake_nvml_sizeof(const char *type) {
    if (!strcmp(type, "nvmlPciInfo_t")) return sizeof(nvmlPciInfo_t);
    if (!strcmp(type, "nvmlMemory_t")) return sizeof(nvmlMemory_t);
    if (!strcmp(type, "nvmlMemory_v2_t")) return sizeof(nvmlMemory_v2_t);
    if (!strcmp(type, "nvmlUtilization_t")) return sizeof(nvmlUtilization_t);
    if (!strcmp(type, "nvmlFieldValue_t")) return sizeof(nvmlFieldValue_t);
    if (!strcmp(type, "nvmlProcessInfo_v2_t")) return sizeof(nvmlProcessInfo_v2_t);
    if (!strcmp(type, "nvmlProcessUtilizationSample_t")) return sizeof(nvmlProcessUtilizationSample_t);
    if (!strcmp(type, "nvmlEventData_t")) return sizeof(nvmlEventData_t);
    if (!strcmp(type, "nvmlGpmMetric_t")) return sizeof(nvmlGpmMetric_t);
    if (!strcmp(type, "nvmlGpmMetricsGet_t")) return sizeof(nvmlGpmMetricsGet_t);
    if (!strcmp(type, "nvmlGpmSupport_t")) return sizeof(nvmlGpmSupport_t);
    if (!strcmp(type, "nvmlTemperature_v1_t")) return sizeof(struct { unsigned int v, s; int t; });
    return -1;
}

/* ---- control file -------------------------------------------------------------------------------------- */

static void set_defaults(struct config *c) {
    memset(c, 0, sizeof *c);
    c->gpus = 2;
    c->frozen_time = -1.0;
    for (int i = 0; i < FAKE_MAX_GPUS; i++) {
        c->gpu[i].gpm = 1;
        c->gpu[i].clock_reasons = -1;
        strcpy(c->gpu[i].unsupported, ",");
        strcpy(c->gpu[i].no_permission, ",");
    }
}

static void set_list(char *dst, const char *value) {
    snprintf(dst, LIST_LEN, ",%s,", value);
}

static void parse_processes(struct gpu_config *g, char *value) {
    g->nprocs = 0;
    for (char *save = NULL, *item = strtok_r(value, ",", &save); item && g->nprocs < MAX_PROCS;
         item = strtok_r(NULL, ",", &save)) {
        unsigned int pid; unsigned long long bytes;
        if (sscanf(item, "%u:%llu", &pid, &bytes) == 2) {
            g->proc_pid[g->nprocs] = pid;
            g->proc_bytes[g->nprocs++] = bytes;
        }
    }
}

static void parse_xids(struct gpu_config *g, char *value) {
    g->nxids = 0;
    for (char *save = NULL, *item = strtok_r(value, ",", &save); item && g->nxids < MAX_XIDS;
         item = strtok_r(NULL, ",", &save))
        g->xids[g->nxids++] = (unsigned int)strtoul(item, NULL, 10);
}

/* "3g.40gb,1g.10gb": MIG on, one GPU instance per well-formed profile; "" is MIG on with none. */
static void parse_mig(struct gpu_config *g, char *value) {
    g->mig_enabled = 1;
    g->nmig = 0;
    for (char *save = NULL, *item = strtok_r(value, ",", &save); item && g->nmig < FAKE_MAX_MIG;
         item = strtok_r(NULL, ",", &save)) {
        unsigned int slices, gib;
        char tail;
        if (sscanf(item, "%ug.%ugb%c", &slices, &gib, &tail) != 2 || slices == 0 || gib == 0) {
            fprintf(stderr, "fake_nvml: ignoring MIG profile '%s' (expected <n>g.<m>gb)\n", item);
            continue;
        }
        snprintf(g->mig_profile[g->nmig], sizeof g->mig_profile[0], "%s", item);
        g->mig_memory[g->nmig++] = (unsigned long long)gib << 30;
    }
}

static void add_hang(struct config *c, int gpu, const char *function, const char *seconds) {
    if (c->nhangs >= MAX_HANGS) return;
    struct hang *h = &c->hangs[c->nhangs++];
    h->gpu = gpu;
    snprintf(h->function, sizeof h->function, "%.63s", function);
    h->seconds = atof(seconds);
}

static void parse_gpu_key(struct config *c, int n, const char *key, char *value) {
    struct gpu_config *g = &c->gpu[n];
    if (!strcmp(key, "gpm")) g->gpm = atoi(value);
    else if (!strcmp(key, "lost")) g->lost = atoi(value);
    else if (!strcmp(key, "name")) { snprintf(g->name, sizeof g->name, "%s", value); g->name_set = 1; }
    else if (!strcmp(key, "unsupported")) set_list(g->unsupported, value);
    else if (!strcmp(key, "no_permission")) set_list(g->no_permission, value);
    else if (!strcmp(key, "processes")) parse_processes(g, value);
    else if (!strcmp(key, "xid")) parse_xids(g, value);
    else if (!strcmp(key, "xid_storm")) sscanf(value, "%u:%lf", &g->storm_xid, &g->storm_rate);
    else if (!strcmp(key, "clock_reasons")) g->clock_reasons = strtoll(value, NULL, 0);
    else if (!strcmp(key, "mig")) parse_mig(g, value);
    else if (!strncmp(key, "field.", 6)) {
        int id = atoi(key + 6);
        if (id > 0 && id < FIELD_MAX) { g->field_set[id] = 1; g->field_value[id] = strtoull(value, NULL, 0); }
    } else if (!strncmp(key, "hang.", 5)) {
        add_hang(c, n, key + 5, value);
    }
}

static void parse_line(struct config *c, char *line) {
    char *eq = strchr(line, '=');
    if (!eq || line[0] == '#') return;
    *eq = 0;
    char *key = line, *value = eq + 1;
    value[strcspn(value, "\r\n")] = 0;
    int n;
    if (!strcmp(key, "gpus")) {
        c->gpus = atoi(value);
        if (c->gpus < 0) c->gpus = 0;
        if (c->gpus > FAKE_MAX_GPUS) c->gpus = FAKE_MAX_GPUS;
    } else if (!strcmp(key, "driver_missing")) c->driver_missing = atoi(value);
    else if (!strcmp(key, "driver_unloaded")) c->driver_unloaded = atoi(value);
    else if (!strcmp(key, "frozen_time")) c->frozen_time = atof(value);
    else if (!strncmp(key, "hang.", 5)) add_hang(c, -1, key + 5, value);
    else if (sscanf(key, "gpu%d.", &n) == 1 && n >= 0 && n < FAKE_MAX_GPUS) {
        parse_gpu_key(c, n, strchr(key, '.') + 1, value);
    }
}

/* Re-read the control file if it changed. Caller holds `lock`. */
static void reload_locked(void) {
    const char *path = getenv("FAKE_NVML_CONTROL");
    struct stat st;
    if (!path || stat(path, &st) != 0) {
        if (control_id.present || cfg.gpus == 0) {
            set_defaults(&cfg);
            control_id.present = 0;
        }
        return;
    }
    if (control_id.present && control_id.dev == st.st_dev && control_id.ino == st.st_ino &&
        control_id.size == st.st_size && control_id.mtime.tv_sec == st.st_mtim.tv_sec &&
        control_id.mtime.tv_nsec == st.st_mtim.tv_nsec)
        return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    static struct config next; /* big: keep it off the stack; protected by `lock` */
    set_defaults(&next);
    char line[4096];
    while (fgets(line, sizeof line, f)) parse_line(&next, line);
    fclose(f);
    for (int i = 0; i < FAKE_MAX_GPUS; i++) {
        unsigned int key = next.gpu[i].storm_xid * 100003u + (unsigned int)(next.gpu[i].storm_rate * 1000);
        if (key != storm_key[i]) { storm_key[i] = key; storm_since[i] = now(); storm_delivered[i] = 0; }
    }
    cfg = next;
    control_id.present = 1;
    control_id.dev = st.st_dev; control_id.ino = st.st_ino; control_id.size = st.st_size;
    control_id.mtime = st.st_mtim;
}

static int in_list(const char *list, const char *name) {
    char needle[80];
    snprintf(needle, sizeof needle, ",%s,", name);
    return strstr(list, needle) != NULL;
}

/* Seconds `function` should still hang on `gpu` (-1: none), from the current control file. */
static double hang_seconds_locked(const char *function, int gpu) {
    for (int i = 0; i < cfg.nhangs; i++)
        if ((cfg.hangs[i].gpu == -1 || cfg.hangs[i].gpu == gpu) && !strcmp(cfg.hangs[i].function, function))
            return cfg.hangs[i].seconds;
    return 0;
}

/* Sleep as configured, in short slices so that removing the hang from the control file ends it. */
static void maybe_hang(const char *function, int gpu) {
    double start = now();
    for (;;) {
        pthread_mutex_lock(&lock);
        reload_locked();
        double seconds = hang_seconds_locked(function, gpu);
        pthread_mutex_unlock(&lock);
        if (now() - start >= seconds) return;
        struct timespec slice = {0, 10 * 1000 * 1000};
        nanosleep(&slice, NULL);
    }
}

/* Common entry of every exported NVML function: count, reload, hang, check init. */
static nvmlReturn_t enter(const char *function, int gpu) {
    pthread_mutex_lock(&lock);
    count_call_locked(function);
    reload_locked();
    if (cfg.driver_unloaded) init_count = 0; /* driver_unloaded: the session does not survive a reload */
    int initialized = init_count > 0;
    pthread_mutex_unlock(&lock);
    maybe_hang(function, gpu);
    return initialized ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
}

/* The GPU index behind a handle of ours (-1: not ours) and its MIG instance (0: the whole GPU). */
static int resolve_handle(nvmlDevice_t device, unsigned int *instance) {
    const struct fake_gpu *first_mig = &mig_handles[0][0];
    *instance = 0;
    if (device >= handles && device < handles + FAKE_MAX_GPUS) return device->index;
    if (device >= first_mig && device < first_mig + FAKE_MAX_GPUS * FAKE_MAX_MIG) {
        *instance = device->instance;
        return device->index;
    }
    return -1;
}

/* Entry of a function that takes a GPU or a MIG device handle: also validates the handle and applies
   the GPU's faults (a MIG device shares its parent's). On success *gpu is the (parent) GPU's index
   and *instance the MIG instance, 0 for the whole GPU. */
static nvmlReturn_t enter_any_device(const char *function, nvmlDevice_t device, int *gpu, unsigned int *instance) {
    int index = resolve_handle(device, instance);
    nvmlReturn_t r = enter(function, index);
    if (r != NVML_SUCCESS) return r;
    pthread_mutex_lock(&lock);
    if (index < 0 || index >= cfg.gpus) r = NVML_ERROR_INVALID_ARGUMENT;
    else if (cfg.gpu[index].lost) r = NVML_ERROR_GPU_IS_LOST;
    else if (*instance > 0 && (!cfg.gpu[index].mig_enabled || *instance > (unsigned int)cfg.gpu[index].nmig))
        r = NVML_ERROR_INVALID_ARGUMENT; /* the MIG instance was destroyed since the handle was taken */
    else if (in_list(cfg.gpu[index].unsupported, function)) r = NVML_ERROR_NOT_SUPPORTED;
    else if (in_list(cfg.gpu[index].no_permission, function)) r = NVML_ERROR_NO_PERMISSION;
    pthread_mutex_unlock(&lock);
    *gpu = index;
    return r;
}

/* Entry of a whole-GPU function: a MIG device handle is an invalid argument. */
static nvmlReturn_t enter_device(const char *function, nvmlDevice_t device, int *gpu) {
    unsigned int instance;
    nvmlReturn_t r = enter_any_device(function, device, gpu, &instance);
    return r == NVML_SUCCESS && instance != 0 ? NVML_ERROR_INVALID_ARGUMENT : r;
}

#define DEVICE_ENTRY(device) \
    int gpu; \
    nvmlReturn_t entry_status = enter_device(__func__, (device), &gpu); \
    if (entry_status != NVML_SUCCESS) return entry_status

#define ANY_DEVICE_ENTRY(device) \
    int gpu; \
    unsigned int instance; \
    nvmlReturn_t entry_status = enter_any_device(__func__, (device), &gpu, &instance); \
    if (entry_status != NVML_SUCCESS) return entry_status

#define MIG_DEVICE_ENTRY(device) \
    ANY_DEVICE_ENTRY(device); \
    if (instance == 0) return NVML_ERROR_INVALID_ARGUMENT

/* ---- the simulated hardware: deterministic functions of time and GPU index ----------------------------- */

/* `phase` is the GPU index, shifted per MIG instance (mig_phase), so every device moves differently. */
static double wave(double t, double phase, double period) { return sin(2 * M_PI * t / period + phase); }
static double utilization(double t, double phase) { return 50.0 + 40.0 * wave(t, phase, 7.0); }
static double mig_phase(int gpu, unsigned int instance) { return gpu + 0.9 * instance; }
static double power_w(double t, int gpu) { return 350.0 + 50.0 * wave(t, gpu, 11.0); }
/* The exact integral of power_w, so energy and power agree. */
static double energy_j(double t, int gpu) {
    double k = 2 * M_PI / 11.0;
    return 350.0 * t - 50.0 / k * (cos(k * t + gpu) - cos((double)gpu));
}
static const unsigned long long TOTAL_MEMORY = 80ull << 30;
static const unsigned long long RESERVED_MEMORY = 512ull << 20;

static unsigned long long process_memory_locked(int gpu) {
    unsigned long long sum = 0;
    for (int i = 0; i < cfg.gpu[gpu].nprocs; i++) sum += cfg.gpu[gpu].proc_bytes[i];
    return sum;
}

static unsigned long long used_memory_locked(int gpu, double t) {
    unsigned long long used = process_memory_locked(gpu) + (unsigned long long)((1.0 + wave(t, gpu, 13.0)) * (256 << 20));
    return used > TOTAL_MEMORY - RESERVED_MEMORY ? TOTAL_MEMORY - RESERVED_MEMORY : used;
}

/* Memory of the whole GPU (instance 0) or of one MIG instance, which reserves nothing of its own and
   uses between 0 and a quarter of its slice. */
static void memory_locked(int gpu, unsigned int instance, double t, unsigned long long *total,
                          unsigned long long *reserved, unsigned long long *used) {
    if (instance == 0) {
        *total = TOTAL_MEMORY;
        *reserved = RESERVED_MEMORY;
        *used = used_memory_locked(gpu, t);
        return;
    }
    *total = cfg.gpu[gpu].mig_memory[instance - 1];
    *reserved = 0;
    *used = (unsigned long long)((1.0 + wave(t, mig_phase(gpu, instance), 13.0)) * (double)(*total / 8));
}

static double gpm_metric_percent(unsigned int id, double t, double phase) {
    double u = utilization(t, phase) / 100.0; /* 0.1 .. 0.9 */
    switch (id) {
    case 1: return 100.0 * u;              /* GRAPHICS_UTIL */
    case 2: return 95.0 * u;               /* SM_UTIL */
    case 3: return 60.0 * u;               /* SM_OCCUPANCY */
    case 5: return 100.0 * u * u;          /* ANY_TENSOR_UTIL */
    case 10: return 100.0 * (1.0 - u);     /* DRAM_BW_UTIL: high when tensor is low (decode-like) */
    case 11: return 1.0;                   /* FP64 */
    case 12: return 20.0 * u;              /* FP32 */
    case 13: return 30.0 * u;              /* FP16 */
    case 20: case 21: return 2000.0 * u;   /* PCIe MiB/s */
    case 60: case 61: return 50000.0 * u;  /* NVLink MiB/s */
    default: return -1;                    /* not simulated: NOT_SUPPORTED */
    }
}

/* ---- init and system ------------------------------------------------------------------------------------ */

static nvmlReturn_t do_init(const char *function) {
    pthread_mutex_lock(&lock);
    count_call_locked(function);
    reload_locked();
    int missing = cfg.driver_missing || cfg.driver_unloaded;
    pthread_mutex_unlock(&lock);
    maybe_hang(function, -1);
    if (missing) return NVML_ERROR_DRIVER_NOT_LOADED;
    pthread_mutex_lock(&lock);
    init_count++;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; return do_init(__func__); }
nvmlReturn_t nvmlInit_v2(void) { return do_init(__func__); }
nvmlReturn_t nvmlInit(void) { return do_init(__func__); }

nvmlReturn_t nvmlShutdown(void) {
    nvmlReturn_t r = enter(__func__, -1);
    if (r != NVML_SUCCESS) return r;
    pthread_mutex_lock(&lock);
    if (init_count > 0) init_count--;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    default: return "Fake NVML error";
    }
}

static nvmlReturn_t copy_string(char *dst, unsigned int length, const char *src) {
    if (strlen(src) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(dst, src);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    nvmlReturn_t r = enter(__func__, -1);
    return r ? r : copy_string(version, length, "550.54.15");
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    nvmlReturn_t r = enter(__func__, -1);
    return r ? r : copy_string(version, length, "12.550.54.15");
}

static nvmlReturn_t cuda_version(const char *function, int *version) {
    nvmlReturn_t r = enter(function, -1);
    if (r == NVML_SUCCESS) *version = 12040;
    return r;
}
nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *v) { return cuda_version(__func__, v); }
nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *v) { return cuda_version(__func__, v); }

/* ---- device discovery and identity ---------------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    nvmlReturn_t r = enter(__func__, -1);
    if (r != NVML_SUCCESS) return r;
    pthread_mutex_lock(&lock);
    *count = (unsigned int)cfg.gpus;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

static nvmlReturn_t handle_for(int index, nvmlDevice_t *device) {
    pthread_mutex_lock(&lock);
    nvmlReturn_t r = NVML_SUCCESS;
    if (index < 0 || index >= cfg.gpus) r = NVML_ERROR_INVALID_ARGUMENT;
    else if (cfg.gpu[index].lost) r = NVML_ERROR_GPU_IS_LOST;
    else *device = &handles[index];
    pthread_mutex_unlock(&lock);
    return r;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    nvmlReturn_t r = enter(__func__, (int)index);
    return r ? r : handle_for((int)index, device);
}

static void format_uuid(int gpu, char *out, size_t size) {
    snprintf(out, size, "GPU-0000fa4e-0000-4000-8000-%012x", (unsigned int)gpu);
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    nvmlReturn_t r = enter(__func__, -1);
    if (r != NVML_SUCCESS) return r;
    char candidate[96];
    for (int i = 0; i < FAKE_MAX_GPUS; i++) {
        format_uuid(i, candidate, sizeof candidate);
        if (!strcmp(candidate, uuid)) return handle_for(i, device);
    }
    return NVML_ERROR_NOT_FOUND;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    ANY_DEVICE_ENTRY(device);
    char text[96];
    if (instance == 0) format_uuid(gpu, text, sizeof text);
    else snprintf(text, sizeof text, "MIG-0000fa4e-%04x-4000-8000-%012x", (unsigned int)gpu, instance);
    return copy_string(uuid, length, text);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    ANY_DEVICE_ENTRY(device);
    pthread_mutex_lock(&lock);
    struct gpu_config *g = &cfg.gpu[gpu];
    const char *model = g->name_set ? g->name : g->gpm ? "NVIDIA H100 80GB HBM3" : "NVIDIA A100-SXM4-80GB";
    char text[160];
    if (instance == 0) snprintf(text, sizeof text, "%s", model);
    else snprintf(text, sizeof text, "%s MIG %s", model, g->mig_profile[instance - 1]);
    pthread_mutex_unlock(&lock);
    return copy_string(name, length, text);
}

nvmlReturn_t nvmlDeviceGetSerial(nvmlDevice_t device, char *serial, unsigned int length) {
    DEVICE_ENTRY(device);
    char text[32];
    snprintf(text, sizeof text, "1654%09d", gpu);
    return copy_string(serial, length, text);
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    DEVICE_ENTRY(device);
    memset(pci, 0, sizeof *pci);
    pci->domain = 0;
    pci->bus = 0x18 + 0x10 * (unsigned int)gpu;
    pci->device = 0;
    pci->pciDeviceId = 0x233010DE;
    pci->pciSubSystemId = 0x16C110DE;
    snprintf(pci->busId, sizeof pci->busId, "00000000:%02X:00.0", pci->bus);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02X:00.0", pci->bus);
    return NVML_SUCCESS;
}

/* ---- MIG ------------------------------------------------------------------------------------------------ */

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending) {
    DEVICE_ENTRY(device);
    pthread_mutex_lock(&lock);
    *current = *pending = cfg.gpu[gpu].mig_enabled ? MIG_ENABLE : 0;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count) {
    DEVICE_ENTRY(device);
    pthread_mutex_lock(&lock);
    *count = cfg.gpu[gpu].mig_enabled ? FAKE_MAX_MIG : 0;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index, nvmlDevice_t *mig) {
    DEVICE_ENTRY(device);
    pthread_mutex_lock(&lock);
    const struct gpu_config *g = &cfg.gpu[gpu];
    nvmlReturn_t r = NVML_SUCCESS;
    if (!g->mig_enabled || index >= FAKE_MAX_MIG) r = NVML_ERROR_INVALID_ARGUMENT;
    else if (index >= (unsigned int)g->nmig) r = NVML_ERROR_NOT_FOUND; /* no MIG device at this index */
    else *mig = &mig_handles[gpu][index];
    pthread_mutex_unlock(&lock);
    return r;
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t mig, nvmlDevice_t *device) {
    MIG_DEVICE_ENTRY(mig);
    *device = &handles[gpu];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *is_mig) {
    ANY_DEVICE_ENTRY(device);
    *is_mig = instance != 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t mig, unsigned int *id) {
    MIG_DEVICE_ENTRY(mig);
    *id = instance;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t mig, unsigned int *id) {
    MIG_DEVICE_ENTRY(mig);
    *id = 0; /* one compute instance per GPU instance in this fake */
    return NVML_SUCCESS;
}

/* ---- per-tick readings ----------------------------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *util) {
    DEVICE_ENTRY(device);
    double t = elapsed();
    util->gpu = (unsigned int)utilization(t, gpu);
    util->memory = (unsigned int)(100.0 - utilization(t, gpu)) / 2;
    return NVML_SUCCESS;
}

/* v1 counts reserved memory as used; v2 reports it apart. */
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    ANY_DEVICE_ENTRY(device);
    unsigned long long reserved, used;
    pthread_mutex_lock(&lock);
    memory_locked(gpu, instance, elapsed(), &memory->total, &reserved, &used);
    pthread_mutex_unlock(&lock);
    memory->used = reserved + used;
    memory->free = memory->total - memory->used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    ANY_DEVICE_ENTRY(device);
    if (memory->version != MEMORY_V2_VERSION) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    pthread_mutex_lock(&lock);
    memory_locked(gpu, instance, elapsed(), &memory->total, &memory->reserved, &memory->used);
    pthread_mutex_unlock(&lock);
    memory->free = memory->total - memory->reserved - memory->used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, unsigned int sensor, unsigned int *temp) {
    DEVICE_ENTRY(device);
    if (sensor != 0) return NVML_ERROR_INVALID_ARGUMENT;
    *temp = (unsigned int)(35.0 + 0.4 * utilization(elapsed(), gpu));
    return NVML_SUCCESS;
}

typedef struct { unsigned int version, sensorType; int temperature; } nvmlTemperature_v1_t;
#define TEMPERATURE_V1_VERSION 0x100000Cu

nvmlReturn_t nvmlDeviceGetTemperatureV(nvmlDevice_t device, nvmlTemperature_v1_t *temp) {
    DEVICE_ENTRY(device);
    if (temp->version != TEMPERATURE_V1_VERSION) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (temp->sensorType != 0) return NVML_ERROR_INVALID_ARGUMENT;
    temp->temperature = (int)(35.0 + 0.4 * utilization(elapsed(), gpu));
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, unsigned int type, unsigned int *mhz) {
    DEVICE_ENTRY(device);
    static const unsigned int base[] = {1755, 1755, 2619, 1635}; /* graphics, sm, mem, video */
    if (type > 3) return NVML_ERROR_INVALID_ARGUMENT;
    *mhz = base[type] - (type == 2 ? 0 : (unsigned int)(utilization(elapsed(), gpu)));
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device, unsigned long long *reasons) {
    DEVICE_ENTRY(device);
    pthread_mutex_lock(&lock);
    long long fixed = cfg.gpu[gpu].clock_reasons;
    pthread_mutex_unlock(&lock);
    double t = elapsed();
    if (fixed >= 0) *reasons = (unsigned long long)fixed;
    else *reasons = (utilization(t, gpu) < 20 ? 0x1ull : 0) | (power_w(t, gpu) > 390 ? 0x4ull : 0);
    return NVML_SUCCESS;
}

/* Value and type of scalar field `id` on `gpu` at time t; NOT_SUPPORTED for fields not simulated. */
static nvmlReturn_t field_value_locked(int gpu, unsigned int id, unsigned int scope, double t, nvmlFieldValue_t *out) {
    struct gpu_config *g = &cfg.gpu[gpu];
    char name[32];
    snprintf(name, sizeof name, "field%u", id);
    count_call_locked(name);
    if (in_list(g->unsupported, name) || id >= FIELD_MAX) return NVML_ERROR_NOT_SUPPORTED;
    unsigned long long v;
    unsigned int type = VT_ULLONG;
    switch (id) {
    case 186: v = (unsigned long long)(power_w(t, gpu) * 1000); type = VT_UINT; break; /* mW */
    case 190: v = 700000; type = VT_UINT; break;                                      /* mW */
    case 83: v = (unsigned long long)(energy_j(t, gpu) * 1000); break;                /* mJ */
    case 197: v = (unsigned long long)(t * 1.5e9); break;                             /* bytes */
    case 198: v = (unsigned long long)(t * 0.5e9); break;
    case 94: v = 0; type = VT_UINT; break;
    case 138: case 139: /* KiB, only for all links together in this fake */
        if (scope != NO_INSTANCE) return NVML_ERROR_INVALID_ARGUMENT;
        v = (unsigned long long)(t * (id == 138 ? 40e6 : 30e6));
        break;
    case 82: v = (unsigned long long)(45.0 + 0.3 * utilization(t, gpu)); type = VT_UINT; break;
    case 3: case 4: v = 0; break;
    case 142: case 143: case 144: case 145: v = 0; type = VT_UINT; break;
    default: return NVML_ERROR_NOT_SUPPORTED;
    }
    if (g->field_set[id]) v = g->field_value[id];
    out->valueType = type;
    if (type == VT_UINT) out->value.uiVal = (unsigned int)v;
    else out->value.ullVal = v;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetFieldValues(nvmlDevice_t device, int count, nvmlFieldValue_t *values) {
    DEVICE_ENTRY(device);
    if (count < 0 || (count > 0 && !values)) return NVML_ERROR_INVALID_ARGUMENT;
    double t = elapsed();
    long long stamp = (long long)(t * 1e6);
    pthread_mutex_lock(&lock);
    for (int i = 0; i < count; i++) {
        values[i].timestamp = stamp;
        values[i].latencyUsec = 0;
        values[i].nvmlReturn = field_value_locked(gpu, values[i].fieldId, values[i].scopeId, t, &values[i]);
    }
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

/* ---- processes ---------------------------------------------------------------------------------------- */

static nvmlReturn_t running_processes(const char *function, nvmlDevice_t device, unsigned int *count,
                                      nvmlProcessInfo_v2_t *infos) {
    int gpu;
    nvmlReturn_t r = enter_device(function, device, &gpu);
    if (r != NVML_SUCCESS) return r;
    pthread_mutex_lock(&lock);
    struct gpu_config *g = &cfg.gpu[gpu];
    unsigned int n = (unsigned int)g->nprocs;
    if (n == 0) r = NVML_SUCCESS;
    else if (!infos || *count < n) r = NVML_ERROR_INSUFFICIENT_SIZE;
    else
        for (unsigned int i = 0; i < n; i++) {
            infos[i].pid = g->proc_pid[i];
            infos[i].usedGpuMemory = g->proc_bytes[i];
            infos[i].gpuInstanceId = infos[i].computeInstanceId = NO_INSTANCE;
        }
    *count = n;
    pthread_mutex_unlock(&lock);
    return r;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned int *c, nvmlProcessInfo_v2_t *p) {
    return running_processes(__func__, d, c, p);
}
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t d, unsigned int *c, nvmlProcessInfo_v2_t *p) {
    return running_processes(__func__, d, c, p);
}

/* One utilization sample per process every 100 ms; samples newer than lastSeen are returned. */
nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t device, nvmlProcessUtilizationSample_t *samples,
                                             unsigned int *count, unsigned long long lastSeen) {
    DEVICE_ENTRY(device);
    unsigned long long stamp = (unsigned long long)(elapsed() * 10) * 100000ull; /* µs */
    nvmlReturn_t r = NVML_SUCCESS;
    pthread_mutex_lock(&lock);
    struct gpu_config *g = &cfg.gpu[gpu];
    unsigned int n = stamp > lastSeen ? (unsigned int)g->nprocs : 0;
    if (n == 0) r = NVML_ERROR_NOT_FOUND;
    else if (!samples || *count < n) r = NVML_ERROR_INSUFFICIENT_SIZE;
    else
        for (unsigned int i = 0; i < n; i++) {
            memset(&samples[i], 0, sizeof samples[i]);
            samples[i].pid = g->proc_pid[i];
            samples[i].timeStamp = stamp;
            samples[i].smUtil = (g->proc_pid[i] * 7u + (unsigned int)(stamp / 1000000)) % 101u;
            samples[i].memUtil = samples[i].smUtil / 2;
        }
    *count = n;
    pthread_mutex_unlock(&lock);
    return r;
}

/* ---- GPM ----------------------------------------------------------------------------------------------- */

nvmlReturn_t nvmlGpmQueryDeviceSupport(nvmlDevice_t device, nvmlGpmSupport_t *support) {
    DEVICE_ENTRY(device);
    if (support->version != GPM_SUPPORT_VERSION) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    pthread_mutex_lock(&lock);
    support->isSupportedDevice = (unsigned int)cfg.gpu[gpu].gpm;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlGpmSampleAlloc(nvmlGpmSample_t *sample) {
    nvmlReturn_t r = enter(__func__, -1);
    if (r != NVML_SUCCESS) return r;
    *sample = calloc(1, sizeof **sample);
    return *sample ? NVML_SUCCESS : NVML_ERROR_UNKNOWN;
}

nvmlReturn_t nvmlGpmSampleFree(nvmlGpmSample_t sample) {
    nvmlReturn_t r = enter(__func__, -1);
    if (r == NVML_SUCCESS) free(sample);
    return r;
}

nvmlReturn_t nvmlGpmSampleGet(nvmlDevice_t device, nvmlGpmSample_t sample) {
    DEVICE_ENTRY(device);
    if (!sample) return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    int gpm = cfg.gpu[gpu].gpm;
    pthread_mutex_unlock(&lock);
    if (!gpm) return NVML_ERROR_NOT_SUPPORTED;
    sample->gpu = gpu;
    sample->instance = 0;
    sample->t = elapsed();
    sample->taken = 1;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlGpmMigSampleGet(nvmlDevice_t device, unsigned int gpuInstanceId, nvmlGpmSample_t sample) {
    DEVICE_ENTRY(device);
    if (!sample) return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    const struct gpu_config *g = &cfg.gpu[gpu];
    nvmlReturn_t r = NVML_SUCCESS;
    if (!g->gpm) r = NVML_ERROR_NOT_SUPPORTED;
    else if (!g->mig_enabled) r = NVML_ERROR_INVALID_ARGUMENT;
    else if (gpuInstanceId == 0 || gpuInstanceId > (unsigned int)g->nmig) r = NVML_ERROR_NOT_FOUND;
    pthread_mutex_unlock(&lock);
    if (r != NVML_SUCCESS) return r;
    sample->gpu = gpu;
    sample->instance = gpuInstanceId;
    sample->t = elapsed();
    sample->taken = 1;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlGpmMetricsGet(nvmlGpmMetricsGet_t *request) {
    nvmlReturn_t r = enter(__func__, -1);
    if (r != NVML_SUCCESS) return r;
    if (request->version != GPM_METRICS_GET_VERSION) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    nvmlGpmSample_t a = request->sample1, b = request->sample2;
    if (!a || !b || !a->taken || !b->taken || a->gpu != b->gpu || a->instance != b->instance ||
        request->numMetrics > GPM_METRIC_MAX)
        return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    int gpu = a->gpu;
    if (gpu >= cfg.gpus || cfg.gpu[gpu].lost) r = NVML_ERROR_GPU_IS_LOST;
    for (unsigned int i = 0; r == NVML_SUCCESS && i < request->numMetrics; i++) {
        nvmlGpmMetric_t *m = &request->metrics[i];
        char name[32];
        snprintf(name, sizeof name, "gpm%u", m->metricId);
        count_call_locked(name);
        double percent = gpm_metric_percent(m->metricId, (a->t + b->t) / 2, mig_phase(gpu, a->instance));
        m->nvmlReturn = (percent < 0 || in_list(cfg.gpu[gpu].unsupported, name)) ? NVML_ERROR_NOT_SUPPORTED : NVML_SUCCESS;
        m->value = percent < 0 ? 0 : percent;
        m->metricInfo.shortName = m->metricInfo.longName = "fake";
        m->metricInfo.unit = "%";
    }
    pthread_mutex_unlock(&lock);
    return r;
}

/* ---- events (XIDs) ---------------------------------------------------------------------------------------- */

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    nvmlReturn_t r = enter(__func__, -1);
    if (r != NVML_SUCCESS) return r;
    *set = calloc(1, sizeof **set);
    return *set ? NVML_SUCCESS : NVML_ERROR_UNKNOWN;
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
    nvmlReturn_t r = enter(__func__, -1);
    if (r == NVML_SUCCESS) free(set);
    return r;
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *types) {
    DEVICE_ENTRY(device);
    *types = 0x1ull | 0x2ull | 0x4ull | EVENT_XID | 0x10ull;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long types, nvmlEventSet_t set) {
    DEVICE_ENTRY(device);
    if (!set) return NVML_ERROR_INVALID_ARGUMENT;
    pthread_mutex_lock(&lock);
    set->mask[gpu] |= types;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

/* Take the next undelivered XID of a GPU registered in `set`, if any. Caller holds `lock`. */
static int next_xid_locked(nvmlEventSet_t set, nvmlEventData_t *data) {
    for (int gpu = 0; gpu < cfg.gpus; gpu++) {
        struct gpu_config *g = &cfg.gpu[gpu];
        if (!(set->mask[gpu] & EVENT_XID) || g->lost) continue;
        unsigned int xid = 0;
        if (xids_delivered[gpu] < g->nxids) {
            xid = g->xids[xids_delivered[gpu]++];
        } else if (g->storm_rate > 0 &&
                   storm_delivered[gpu] < (unsigned long long)((now() - storm_since[gpu]) * g->storm_rate)) {
            storm_delivered[gpu]++;
            xid = g->storm_xid;
        } else {
            continue;
        }
        data->device = &handles[gpu];
        data->eventType = EVENT_XID;
        data->eventData = xid;
        data->gpuInstanceId = data->computeInstanceId = NO_INSTANCE;
        return 1;
    }
    return 0;
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms) {
    nvmlReturn_t r = enter(__func__, -1);
    if (r != NVML_SUCCESS) return r;
    if (!set || !data) return NVML_ERROR_INVALID_ARGUMENT;
    double deadline = now() + timeoutms / 1000.0;
    for (;;) {
        pthread_mutex_lock(&lock);
        reload_locked();
        int found = next_xid_locked(set, data);
        pthread_mutex_unlock(&lock);
        if (found) return NVML_SUCCESS;
        double left = deadline - now();
        if (left <= 0) return NVML_ERROR_TIMEOUT;
        /* Poll in 50 ms slices: short enough for tests waiting on an XID, long enough that the wait
           costs ~0.1 % of a core. (5 ms slices cost 1.4 ms of CPU per 100 ms on the benchmark VM,
           which the benchmarks then charged to the agent; a real driver blocks in the kernel.) */
        struct timespec slice = {0, (long)((left < 0.05 ? left : 0.05) * 1e9)};
        nanosleep(&slice, NULL);
    }
}
