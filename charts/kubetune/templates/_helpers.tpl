{{/* Names ---------------------------------------------------------------------------------------- */}}

{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>", or the release name alone when it already contains the chart name. */}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{/* Labels ---------------------------------------------------------------------------------------- */}}

{{/* The recommended labels, on every object of the release. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{/* The operator pod's labels that never change (the Deployment's selector). The component keeps the selector
     off the workers, which the operator labels app.kubernetes.io/name=kubetune too (component=worker). */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The labels the operator puts on every worker pod (operator/kubetune_operator/names.py). */}}
{{- define "kubetune.workerLabels" -}}
app.kubernetes.io/managed-by: kubetune-operator
app.kubernetes.io/component: worker
{{- end }}

{{/* Images -------------------------------------------------------------------------------------- */}}

{{- define "kubetune.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The operator container's resources: the values' own, whole, or the defaults when they give none (null). */}}
{{- define "kubetune.operatorResources" -}}
{{- if kindIs "invalid" .Values.resources -}}
requests:
  cpu: 100m
  memory: 256Mi
limits:
  memory: 512Mi
{{- else -}}
{{- toYaml .Values.resources }}
{{- end }}
{{- end }}

{{/* A trainer image; call with (dict "image" .Values.trainerImages.peft "context" $). */}}
{{- define "kubetune.trainerImage" -}}
{{- printf "%s:%s" .image.repository (default .context.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* Operator settings ---------------------------------------------------------------------------- */}}

{{/* The settings file: the `settings` values plus what the chart derives (watched namespaces, trainer images). */}}
{{- define "kubetune.settings" -}}
{{- $images := dict
      "peft" (include "kubetune.trainerImage" (dict "image" .Values.trainerImages.peft "context" .))
      "full" (include "kubetune.trainerImage" (dict "image" .Values.trainerImages.full "context" .)) }}
{{- $settings := merge (dict "namespaces" .Values.watchNamespaces "images" $images) .Values.settings }}
{{- toYaml $settings }}
{{- end }}

{{/* RBAC ---------------------------------------------------------------------------------------- */}}

{{/* What the operator does in a namespace it watches. Bound cluster-wide in cluster mode (ClusterRole) and
     per watched namespace in namespaced mode (Role). Each verb is one the operator's code uses; secrets are
     absent on purpose (workers get the Hugging Face token through a secretKeyRef, the operator never reads it). */}}
{{- define "kubetune.namespacedRules" -}}
# FineTuneJobs: kopf lists and watches them into its cache; the operator GETs one to confirm its
# resourceVersion before creating children (apply.py). It never writes the spec or metadata.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch"]
# The status subresource: every status write is a guarded merge patch.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
# Children carry ownerReferences with blockOwnerDeletion: true; clusters with the
# OwnerReferencesPermissionEnforcement admission plugin (OpenShift) require update on the owner's finalizers.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
# One Indexed Job per attempt (the workers): watched by label, created if absent (GET after a 409),
# labels patched when an existing one is adopted, deleted when the attempt ends or its TTL expires.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The same for the headless Service of an attempt (rank 0's DNS name) and the ConfigMap of a run (the
# trainer config).
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Checkpoint claims from spec.checkpoint.volumeClaimTemplate. No delete: a claim holds checkpoints and
# outputs; an owned claim goes with its FineTuneJob through the garbage collector, never by the operator.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Worker pods are created by the Job controller; the operator only watches them (phase, readiness, exit
# codes, node, GPU time for the cost).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# One Event per transition of a FineTuneJob (kopf's own event posting is off).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/* Who the operator's roles are bound to: its ServiceAccount. */}}
{{- define "kubetune.subjects" -}}
- kind: ServiceAccount
  name: {{ include "kubetune.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end }}
