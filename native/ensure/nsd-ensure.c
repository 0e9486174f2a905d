/* nsd-ensure: create, complete or repair a tenant (io.nsd.Tenant.Ensure) without an
 * interpreter; the ExecStart= of nsd-tenant@.service. Same output and exit status as
 * `nsctl ensure USER`: "created|ok NAME: IPV4 IPV6 in PATH", 0 when the tenant exists
 * afterwards, 1 with one line "nsd-ensure: ..." on standard error otherwise.
 */
#define _GNU_SOURCE
#include <json-c/json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../lib/nsd_client.h"

#define DEFAULT_TIMEOUT_MS 90000 /* a unit's default start timeout: creating may take a while */

static const char usage_text[] =
    "usage: nsd-ensure [--socket PATH] [--timeout SECONDS] USER\n"
    "\n"
    "Create, complete or repair USER's nsd tenant (io.nsd.Tenant.Ensure); exits 0 when\n"
    "the tenant exists afterwards. --socket defaults to $NSD_SOCKET or\n"
    "/run/nsd/io.nsd.Tenant, --timeout to 90 seconds.\n";

static int failure(const char *message)
{
    (void)fprintf(stderr, "nsd-ensure: %s\n", message); /* exits 1 whether or not it shows */
    return 1;
}

static const char *text_of(json_object *o, const char *key)
{
    json_object *v = NULL;
    if (!json_object_object_get_ex(o, key, &v) || !json_object_is_type(v, json_type_string))
        return "?";
    return json_object_get_string(v);
}

int main(int argc, char **argv)
{
    const char *env_socket = getenv("NSD_SOCKET");
    const char *path = env_socket != NULL && *env_socket ? env_socket : NSD_DEFAULT_SOCKET;
    int timeout_ms = DEFAULT_TIMEOUT_MS;
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            return fputs(usage_text, stdout) != EOF && fflush(stdout) == 0 ? 0 : 1;
        }
        if (i + 1 >= argc)
            return failure("an option needs a value (try 'nsd-ensure --help')");
        if (strcmp(argv[i], "--socket") == 0 && argv[i + 1][0] != '\0') {
            path = argv[++i];
        } else if (strcmp(argv[i], "--timeout") == 0) {
            char *end;
            double t = strtod(argv[++i], &end);
            if (*end != '\0' || !(t > 0 && t <= 3600))
                return failure("--timeout must be between 0 and 3600 seconds");
            timeout_ms = (int)(t * 1000) > 0 ? (int)(t * 1000) : 1;
        } else {
            return failure("unknown option (try 'nsd-ensure --help')");
        }
    }
    if (argc - i != 1 || argv[i][0] == '\0')
        return failure("expected exactly one USER (try 'nsd-ensure --help')");

    json_object *params = json_object_new_object();
    if (params == NULL ||
        json_object_object_add(params, "name", json_object_new_string(argv[i])) != 0) {
        json_object_put(params);
        return failure("out of memory");
    }
    struct nsd_reply reply;
    struct nsd_error err;
    enum nsd_result r = nsd_call(path, "io.nsd.Tenant.Ensure", params, timeout_ms, &reply, &err);
    json_object_put(params);
    if (r != NSD_OK)
        return failure(err.message);
    json_object *out = NULL;
    r = nsd_parse_reply(reply.text, reply.len, &out, &err);
    nsd_reply_free(&reply);
    if (r != NSD_OK)
        return failure(err.message);
    json_object *tenant = NULL, *created = NULL;
    if (!json_object_object_get_ex(out, "tenant", &tenant) ||
        !json_object_is_type(tenant, json_type_object)) {
        json_object_put(out);
        return failure("nsd's reply is malformed: no tenant");
    }
    (void)json_object_object_get_ex(out, "created", &created);
    int rc = printf("%s %s: %s %s in %s\n", json_object_get_boolean(created) ? "created" : "ok",
                    text_of(tenant, "name"), text_of(tenant, "ipv4Address"),
                    text_of(tenant, "ipv6Address"), text_of(tenant, "namespacePath"));
    json_object_put(out);
    return rc < 0 || fflush(stdout) != 0 ? 1 : 0;
}
