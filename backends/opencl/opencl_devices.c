/* opencl_devices.c: the OpenCL devices: listing them in the order of
 * device_index (GPUs, then accelerators, then CPUs), the probe that says how
 * many there are and which AUTO may pick, and the device queries used at
 * creation. */
#include "error.h"
#include "opencl_backend.h"

#include <CL/cl.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

/* Every GPU, then accelerator, then CPU device of every platform. Callers
 * hold enumeration_lock. */
static psm_status list_devices_locked(device_list *list)
{
    list->devices = NULL;
    list->count = 0;
    cl_uint platform_count = 0;
    cl_int code = clGetPlatformIDs(0, NULL, &platform_count);
    if (code == -1001 /* CL_PLATFORM_NOT_FOUND_KHR */ || platform_count == 0)
        return psm_set_error(PSM_ERR_NO_DEVICE,
                             "no OpenCL platform (the ICD loader lists none)");
    CL_TRY(code, "clGetPlatformIDs");
    cl_platform_id *platforms = calloc(platform_count, sizeof *platforms);
    if (!platforms)
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY, "cannot list OpenCL platforms");
    code = clGetPlatformIDs(platform_count, platforms, NULL);
    if (code != CL_SUCCESS) {
        free(platforms);
        return opencl_failure(code, "clGetPlatformIDs");
    }
    static const cl_device_type types[3] = {CL_DEVICE_TYPE_GPU, CL_DEVICE_TYPE_ACCELERATOR,
                                            CL_DEVICE_TYPE_CPU};
    psm_status status = PSM_OK;
    for (int pass = 0; pass < 2 && status == PSM_OK; ++pass) {
        /* Pass 0 counts, pass 1 fills. */
        cl_uint filled = 0;
        for (int t = 0; t < 3; ++t) {
            for (cl_uint p = 0; p < platform_count; ++p) {
                cl_uint found = 0;
                code = clGetDeviceIDs(platforms[p], types[t], 0, NULL, &found);
                if (code == CL_DEVICE_NOT_FOUND || found == 0)
                    continue;
                if (code != CL_SUCCESS) {
                    status = opencl_failure(code, "clGetDeviceIDs");
                    break;
                }
                if (pass == 1) {
                    code = clGetDeviceIDs(platforms[p], types[t], found,
                                          list->devices + filled, NULL);
                    if (code != CL_SUCCESS) {
                        status = opencl_failure(code, "clGetDeviceIDs");
                        break;
                    }
                }
                filled += found;
            }
            if (status != PSM_OK)
                break;
        }
        if (status != PSM_OK)
            break;
        if (pass == 0) {
            if (filled == 0) {
                status = psm_set_error(PSM_ERR_NO_DEVICE,
                                       "no OpenCL GPU, accelerator or CPU device on %u "
                                       "platform(s)",
                                       (unsigned)platform_count);
                break;
            }
            list->devices = calloc(filled, sizeof *list->devices);
            if (!list->devices) {
                status = psm_set_error(PSM_ERR_OUT_OF_MEMORY, "cannot list OpenCL devices");
                break;
            }
        }
        list->count = filled;
    }
    free(platforms);
    if (status != PSM_OK) {
        free(list->devices);
        list->devices = NULL;
        list->count = 0;
    }
    return status;
}

/* PoCL 3.1 initialises its devices on the first clGetDeviceIDs; a second
 * thread enumerating meanwhile is told there are none (two threads making
 * their first OpenCL contexts at once: one got PSM_ERR_NO_DEVICE,
 * tests/test_threads.c). Enumeration is therefore one thread at a time. */
static pthread_mutex_t enumeration_lock = PTHREAD_MUTEX_INITIALIZER;

psm_status opencl_list_devices(device_list *list)
{
    pthread_mutex_lock(&enumeration_lock);
    psm_status status = list_devices_locked(list);
    pthread_mutex_unlock(&enumeration_lock);
    return status;
}

/* Named, the backend runs on any device; AUTO takes only the GPUs and
 * accelerators, which opencl_list_devices puts first. */
int opencl_probe(int *device_count, int *auto_device_count, char *reason, size_t reason_size)
{
    device_list list;
    *device_count = 0;
    *auto_device_count = 0;
    if (opencl_list_devices(&list) != PSM_OK) {
        if (reason && reason_size)
            snprintf(reason, reason_size, "%s", psm_last_error());
        psm_clear_error();
        return 0;
    }
    cl_uint cpu_devices = 0;
    char first_cpu[160] = "";
    for (cl_uint i = 0; i < list.count; ++i) {
        cl_device_type type = 0;
        if (clGetDeviceInfo(list.devices[i], CL_DEVICE_TYPE, sizeof type, &type, NULL) !=
                CL_SUCCESS ||
            !(type & CL_DEVICE_TYPE_CPU))
            continue;
        if (cpu_devices++ == 0) {
            cl_platform_id platform = NULL;
            if (clGetDeviceInfo(list.devices[i], CL_DEVICE_PLATFORM, sizeof platform,
                                &platform, NULL) != CL_SUCCESS ||
                clGetPlatformInfo(platform, CL_PLATFORM_NAME, sizeof first_cpu, first_cpu,
                                  NULL) != CL_SUCCESS)
                snprintf(first_cpu, sizeof first_cpu, "unnamed platform");
            first_cpu[sizeof first_cpu - 1] = '\0';
        }
    }
    *device_count = (int)list.count;
    *auto_device_count = (int)(list.count - cpu_devices);
    if (reason && reason_size) {
        if (cpu_devices == 0)
            snprintf(reason, reason_size, "%d device(s)", *device_count);
        else if (*auto_device_count == 0)
            snprintf(reason, reason_size,
                     "only CPU device(s) (%s), which AUTO leaves to the cpu backend; "
                     "name opencl to use them",
                     first_cpu);
        else
            snprintf(reason, reason_size,
                     "%d GPU or accelerator device(s), then %u CPU device(s) (%s) that AUTO "
                     "does not pick",
                     *auto_device_count, (unsigned)cpu_devices, first_cpu);
    }
    free(list.devices);
    return 1;
}

psm_status opencl_device_string(cl_device_id device, cl_device_info what, char *out, size_t size)
{
    out[0] = '\0';
    CL_TRY(clGetDeviceInfo(device, what, size, out, NULL), "clGetDeviceInfo");
    out[size - 1] = '\0';
    return PSM_OK;
}

/* Work-group size from the device: a power of two, at most the device's
 * limit, 256 on GPUs and accelerators (enough items to hide latency in one
 * 1024-token tile) and 64 on CPUs (a CPU runs a group's items as a loop, so
 * fewer items means less bookkeeping). */
size_t opencl_initial_group_size(cl_device_id device, psm_status *status)
{
    size_t max_group = 0, item_sizes[3] = {0, 0, 0};
    cl_device_type type = 0;
    cl_int code = clGetDeviceInfo(device, CL_DEVICE_MAX_WORK_GROUP_SIZE, sizeof max_group,
                                  &max_group, NULL);
    if (code == CL_SUCCESS)
        code = clGetDeviceInfo(device, CL_DEVICE_MAX_WORK_ITEM_SIZES, sizeof item_sizes,
                               item_sizes, NULL);
    if (code == CL_SUCCESS)
        code = clGetDeviceInfo(device, CL_DEVICE_TYPE, sizeof type, &type, NULL);
    if (code != CL_SUCCESS) {
        *status = opencl_failure(code, "clGetDeviceInfo");
        return 0;
    }
    size_t limit = (type & CL_DEVICE_TYPE_CPU) ? 64 : 256;
    if (max_group < limit)
        limit = max_group;
    if (item_sizes[0] < limit)
        limit = item_sizes[0];
    size_t size = 1;
    while (size * 2 <= limit)
        size *= 2;
    *status = PSM_OK;
    return size;
}

